"""What goes in and out of the decoder engine: requests, events, the request handle.

Plain data (no gRPC): the servicer maps these to and from protos.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field

import mlx.core as mx

from services.decoder.sequence import LogitsOptions
from shared.media.types import ProcessedPrompt
from shared.runtime.sampling import SamplingParams


@dataclass
class EngineRequest:
    request_id: str
    prompt: ProcessedPrompt
    features: list[mx.array] = field(default_factory=list)  # evaluated; one per prompt.media
    sampling: SamplingParams = field(default_factory=SamplingParams)
    logits: LogitsOptions = field(default_factory=LogitsOptions)
    max_tokens: int = 0  # 0: up to the context limit
    stop: tuple[str, ...] = ()
    stop_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    feature_fetch_ns: int = 0  # measured by the caller, reported in Timings


@dataclass(frozen=True)
class Delta:
    text: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class Timings:
    queue_ns: int = 0
    feature_fetch_ns: int = 0
    prefill_ns: int = 0
    decode_ns: int = 0


@dataclass(frozen=True)
class Finish:
    reason: str  # "stop" | "length" | "cancelled" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    stop_sequence: str = ""
    timings: Timings = Timings()
    error: str = ""


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    kv_tokens: int
    max_model_len: int
    prompt_tokens_total: int
    generation_tokens_total: int
    requests_total: int


class RequestHandle:
    """Async iterator over a request's events; fed from the engine thread."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.request_id = request_id
        self._loop = loop
        self._events: asyncio.Queue[Delta | Finish] = asyncio.Queue()
        self._cancelled = threading.Event()
        self._done = False

    def cancel(self) -> None:
        """Stop generating; the engine frees the slot within one step (idempotent)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def push(self, event: Delta | Finish) -> None:
        """Engine thread -> event loop."""
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self._cancelled.set()

    def __aiter__(self) -> RequestHandle:
        return self

    async def __anext__(self) -> Delta | Finish:
        if self._done:
            raise StopAsyncIteration
        event = await self._events.get()
        self._done = isinstance(event, Finish)
        return event
