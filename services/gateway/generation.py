"""An open Decoder.Generate stream: its events, its metrics, and its cancellation.

`events()` always ends by cancelling the gRPC call if it is still open, so a client that goes
away (the StreamingResponse generator is cancelled/closed) frees the decoder's slot at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from prism.v1 import decoder_pb2
from starlette.requests import Request

from services.gateway.backends import Backend, BackendPools
from services.gateway.errors import BadGatewayError, ClientClosedError
from services.gateway.metrics import GatewayMetrics
from services.gateway.rpc_errors import rpc_error

T = TypeVar("T")

FINISH_REASONS = {
    decoder_pb2.FINISH_REASON_STOP: "stop",
    decoder_pb2.FINISH_REASON_LENGTH: "length",
    decoder_pb2.FINISH_REASON_TOOL_CALLS: "tool_calls",
    decoder_pb2.FINISH_REASON_CANCELLED: "stop",
    decoder_pb2.FINISH_REASON_UNSPECIFIED: "stop",
}


class Generation:
    def __init__(
        self,
        model: str,
        arrived: float,
        call: Any,
        backend: Backend,
        first: decoder_pb2.GenerateResponse,
        pools: BackendPools,
        metrics: GatewayMetrics,
    ) -> None:
        self.model, self.arrived, self.call, self.backend = model, arrived, call, backend
        self.pools, self.metrics = pools, metrics
        self._first: decoder_pb2.GenerateResponse | None = first
        self._phase = "waiting"  # -> "running" at the first delta -> "done"
        self._last = arrived

    def _observe(self, ev: decoder_pb2.GenerateResponse) -> None:
        m, now = self.metrics, time.perf_counter()
        if ev.HasField("delta"):
            if self._phase == "waiting":
                m.waiting.labels(self.model).dec()
                m.running.labels(self.model).inc()
                m.ttft.labels(self.model).observe(now - self.arrived)
                self._phase = "running"
            else:
                m.itl.labels(self.model).observe(now - self._last)
            self._last = now
            return
        f = ev.finish
        m.prompt_tokens.labels(self.model).inc(f.usage.prompt_tokens)
        m.prefix_cache_queries.labels(self.model).inc(f.usage.prompt_tokens)
        m.prefix_cache_hits.labels(self.model).inc(f.usage.cached_prompt_tokens)
        m.generation_tokens.labels(self.model).inc(f.usage.completion_tokens)
        m.e2e.labels(self.model).observe(now - self.arrived)
        t = f.timings
        for phase, ns in (
            ("queue", t.queue_ns + t.feature_fetch_ns),
            ("prefill", t.prefill_ns),
            ("decode", t.decode_ns),
        ):
            m.phases[phase].labels(self.model).observe(ns / 1e9)
        if f.reason == decoder_pb2.FINISH_REASON_ERROR:
            m.errors.labels("decoder_error").inc()
        else:
            m.success.labels(self.model, FINISH_REASONS.get(f.reason, "stop")).inc()

    def _end(self) -> None:
        if self._phase == "waiting":
            self.metrics.waiting.labels(self.model).dec()
        elif self._phase == "running":
            self.metrics.running.labels(self.model).dec()
        self._phase = "done"

    async def events(self) -> AsyncIterator[decoder_pb2.GenerateResponse]:
        """Deltas then one Finish; gRPC failures surface as PrismErrors."""
        try:
            ev = self._first
            self._first = None
            while ev is not None:
                self._observe(ev)
                yield ev
                if ev.HasField("finish"):
                    await self.call.read()  # drain to EOF so the call ends cleanly
                    return
                nxt = await self.call.read()
                ev = None if nxt is grpc.aio.EOF else nxt
            raise BadGatewayError("decoder stream ended without a finish event")
        except grpc.aio.AioRpcError as err:
            raise rpc_error(err, self.backend, self.pools) from err
        finally:
            self._end()
            if not self.call.done():
                self.call.cancel()  # client gone or error: free the decoder's slot now

    def close(self) -> None:
        """Idempotent: settle the gauges and cancel the call if still open. For the paths where
        events() never started (client gone before the first chunk), so its finally never ran."""
        self._end()
        if not self.call.done():
            self.call.cancel()


@dataclass
class Collected:
    """A whole completion, for the non-streaming answers."""

    text: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    tool_calls: list[decoder_pb2.ToolCall] = field(default_factory=list)
    logprobs: list[decoder_pb2.TokenLogprob] = field(default_factory=list)
    finish: decoder_pb2.Finish | None = None

    def add(self, ev: decoder_pb2.GenerateResponse) -> None:
        if ev.HasField("delta"):
            d = ev.delta
            self.text.append(d.text)
            self.reasoning.append(d.reasoning_text)
            self.tool_calls.extend(d.tool_calls)
            self.logprobs.extend(d.logprobs)
        else:
            self.finish = ev.finish


async def collect(gen: Generation) -> Collected:
    out = Collected()
    async for ev in gen.events():
        out.add(ev)
    if out.finish is not None and out.finish.reason == decoder_pb2.FINISH_REASON_ERROR:
        raise BadGatewayError(f"generation failed: {out.finish.error or 'decoder error'}")
    return out


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def race_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, but cancel it (ClientClosedError) if the client disconnects meanwhile:
    a request still waiting for media, an encoder or the decoder's first token frees its
    place at once instead of at the deadline."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        watch.cancel()
    if task.cancelled():
        raise ClientClosedError("client closed the connection")
    return task.result()


async def collect_unless_disconnected(gen: Generation, request: Request) -> Collected:
    """collect(), cancelling the generation if the client disconnects meanwhile."""
    try:
        return await race_disconnect(request, collect(gen))
    finally:
        gen.close()  # no-op when finished; cancels the call when events() never ran
