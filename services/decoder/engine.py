"""The decoder engine: generation on one dedicated MLX thread, results as async events.

`submit` queues a request (bounded FIFO; full -> OverloadedError) and returns a RequestHandle,
an async iterator of Delta events and one final Finish. The engine thread takes requests from
the queue, prefills, then decodes token by token, checking the handle's cancel flag every step.
Today it runs one request at a time; continuous batching (#4) replaces `_loop` and keeps
`submit`, the handle and the events unchanged.
"""

from __future__ import annotations

import asyncio
import dataclasses
import queue
import time
from concurrent.futures import Future

import structlog

from services.decoder.sequence import LogitsOptions, Sequence
from services.decoder.stops import StopMatcher
from services.decoder.types import (
    Delta,
    EngineRequest,
    EngineStats,
    Finish,
    RequestHandle,
    Timings,
)
from shared.errors import BackendUnavailableError, InvalidRequestError, OverloadedError
from shared.loading.config import text_config
from shared.runtime import mlx_thread
from shared.runtime.detokenizer import StreamingDetokenizer
from shared.runtime.loaded import LoadedModel

log = structlog.get_logger("decoder")

__all__ = [
    "DecoderEngine",
    "Delta",
    "EngineRequest",
    "EngineStats",
    "Finish",
    "LogitsOptions",
    "RequestHandle",
]


_STOP = object()


class DecoderEngine:
    def __init__(
        self,
        model: LoadedModel,
        model_id: str,
        *,
        max_model_len: int | None = None,
        max_waiting: int = 64,
        worker: mlx_thread.MLXWorker | None = None,
    ) -> None:
        if model.language is None:
            raise ValueError("the decoder needs the language model (components=['language'])")
        self.model, self.model_id = model, model_id
        cfg = text_config(model.config)
        self.max_model_len = int(max_model_len or cfg.get("max_position_embeddings") or 32768)
        self.vocab_size = int(cfg["vocab_size"])
        self.max_waiting = max_waiting
        self._worker = worker or mlx_thread.worker()
        self._queue: queue.Queue = queue.Queue()
        self._loop_future: Future | None = None
        self._closed = False
        self._running: Sequence | None = None
        self._handle: RequestHandle | None = None  # the running request's, for shutdown
        self._totals = [0, 0, 0]  # prompt tokens, generated tokens, requests

    def start(self) -> None:
        """Occupy the MLX thread with the engine loop (nothing else may use it until shutdown)."""
        self._loop_future = self._worker.submit(self._loop)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Cancel what is queued or running and stop the loop."""
        self._closed = True
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                item[0].cancel()
                item[0].push(Finish("cancelled", error="the decoder is shutting down"))
        if (running := self._handle) is not None:
            running.cancel()
        self._queue.put(_STOP)
        if self._loop_future is not None:
            self._loop_future.result(timeout)

    def stats(self) -> EngineStats:
        seq = self._running
        return EngineStats(
            running=int(seq is not None),
            waiting=self._queue.qsize(),
            kv_tokens=seq.kv_tokens if seq is not None else 0,
            max_model_len=self.max_model_len,
            prompt_tokens_total=self._totals[0],
            generation_tokens_total=self._totals[1],
            requests_total=self._totals[2],
        )

    def submit(self, request: EngineRequest) -> RequestHandle:
        """Validate and queue; call from the event loop. Raises before anything is queued."""
        if self._closed or self._loop_future is None or self._loop_future.done():
            raise BackendUnavailableError("the decoder is not running (shutting down?)")
        max_tokens = self._validate(request)
        if self._queue.qsize() >= self.max_waiting:
            raise OverloadedError(f"the decoder queue is full ({self.max_waiting} waiting)")
        handle = RequestHandle(request.request_id, asyncio.get_running_loop())
        self._queue.put((handle, request, max_tokens, time.perf_counter_ns()))
        return handle

    def _validate(self, request: EngineRequest) -> int:
        ids = request.prompt.input_ids
        if not ids:
            raise InvalidRequestError("the prompt is empty")
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise InvalidRequestError(f"prompt token ids must be in [0, {self.vocab_size})")
        room = self.max_model_len - len(ids)
        if room <= 0:
            raise InvalidRequestError(
                f"the prompt has {len(ids)} tokens; this model's context is {self.max_model_len}"
            )
        if request.max_tokens > room:
            raise InvalidRequestError(
                f"prompt ({len(ids)} tokens) + max_tokens ({request.max_tokens}) exceeds the "
                f"model's context of {self.max_model_len} tokens",
                param="max_tokens",
            )
        try:
            request.sampling.validate()
        except ValueError as exc:
            raise InvalidRequestError(str(exc)) from exc
        return request.max_tokens or room

    def _loop(self) -> None:
        while (item := self._queue.get()) is not _STOP:
            handle, request, max_tokens, submitted = item
            structlog.contextvars.bind_contextvars(request_id=request.request_id)
            self._handle = handle
            try:
                finish = self._run(handle, request, max_tokens, submitted)
            except Exception as exc:  # noqa: BLE001 - one request's failure never stops the loop
                log.exception("generation_failed")
                finish = Finish("error", error=f"{type(exc).__name__}: {exc}")
            # Free the slot before the caller sees Finish, so stats never lag behind it.
            self._running = self._handle = None
            handle.push(finish)
            structlog.contextvars.unbind_contextvars("request_id")

    def _run(self, handle: RequestHandle, req: EngineRequest, max_tokens: int, t0: int) -> Finish:
        admitted = time.perf_counter_ns()
        n_prompt = len(req.prompt.input_ids)
        timings = Timings(queue_ns=admitted - t0, feature_fetch_ns=req.feature_fetch_ns)
        if handle.cancelled:  # cancelled while waiting: nothing to free
            return Finish("cancelled", n_prompt, timings=timings)
        eos = frozenset() if req.ignore_eos else self.model.eos_token_ids
        ends = eos | req.stop_token_ids
        logits = dataclasses.replace(req.logits, banned_until_min=ends)  # for min_tokens
        seq = Sequence(self.model, req.prompt, req.features, req.sampling, logits)
        self._running = seq
        self._totals[0] += n_prompt
        detok, stops = StreamingDetokenizer(self.model.tokenizer), StopMatcher(req.stop)
        reason, stop_sequence, first = "", "", 0
        if not seq.prefill(lambda: handle.cancelled):
            reason = "cancelled"
        while not reason:
            if handle.cancelled:
                reason = "cancelled"
                break
            token = seq.next_token(more=seq.generated + 1 < max_tokens)
            first = first or time.perf_counter_ns()
            text, hit = stops.feed("" if token in ends else detok.add(token))
            if hit is not None:
                reason, stop_sequence = "stop", hit
            elif token in ends:
                reason = "stop"
            elif seq.generated >= max_tokens:
                reason = "length"
            if reason and hit is None:  # release what was held back for a possible stop
                tail, hit = stops.feed(detok.flush())
                text += tail if hit is not None else tail + stops.flush()
                stop_sequence = hit or ""
            handle.push(Delta(text, (token,)))
        last = time.perf_counter_ns()
        self._totals[1] += seq.generated
        self._totals[2] += 1
        timings = dataclasses.replace(
            timings, prefill_ns=(first or last) - admitted, decode_ns=last - first if first else 0
        )
        log.info(
            "generated", reason=reason, prompt_tokens=n_prompt, completion_tokens=seq.generated,
            queue_ms=timings.queue_ns // 1_000_000, prefill_ms=timings.prefill_ns // 1_000_000,
            decode_ms=timings.decode_ns // 1_000_000,
        )  # fmt: skip
        return Finish(reason, n_prompt, seq.generated, stop_sequence, timings)
