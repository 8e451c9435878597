"""What goes in and out of the decoder engine: requests, events, the request handle.

Plain data (no gRPC): the servicer maps these to and from protos.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from services.decoder.constraints import TokenConstraint
from services.decoder.options import LogitsOptions
from shared.media.types import ProcessedPrompt
from shared.models.base import MediaFeatures
from shared.runtime.sampling import SamplingParams


@dataclass
class EngineRequest:
    request_id: str
    prompt: ProcessedPrompt
    features: list[MediaFeatures] = field(default_factory=list)  # evaluated; one per media
    sampling: SamplingParams = field(default_factory=SamplingParams)
    logits: LogitsOptions = field(default_factory=LogitsOptions)
    max_tokens: int = 0  # 0: up to the context limit
    stop: tuple[str, ...] = ()
    stop_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    feature_fetch_ns: int = 0  # measured by the caller, reported in Timings
    logprobs: bool = False  # report each token's log-probability
    top_logprobs: int = 0  # and this many alternatives (up to the engine's top_logprobs_k)
    constraints: list[TokenConstraint] = field(default_factory=list)  # masks ANDed
    prefix_keys: list[str] = field(default_factory=list)  # APC block keys of the prompt
    speculative: bool = True  # may draft when the engine has a drafter (False: never)
    num_draft_tokens: int = 0  # at most this many drafts per step (0: the engine's)


@dataclass(frozen=True)
class TokenLogprob:
    """The raw model log-probability of a generated token, and the most likely alternatives."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


@dataclass(frozen=True)
class Delta:
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token id when the request asked


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
    cached_tokens: int = 0  # prompt tokens reused from the prefix cache
    accepted_draft_tokens: int = 0  # completion tokens a drafter proposed and the target kept


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    kv_tokens: int  # KV tokens held (padded rows x longest reservation)
    max_model_len: int
    prompt_tokens_total: int
    generation_tokens_total: int
    requests_total: int
    kv_usage: float = 0.0  # fraction of the KV budget in use, 0..1
    spec_num_drafts: int = 0  # speculative decoding: row-steps that drafted
    spec_num_draft_tokens: int = 0  # tokens drafted
    spec_num_accepted_tokens: int = 0  # drafted tokens the target accepted


class RequestHandle:
    """Async iterator over a request's events; fed from the engine thread."""

    def __init__(
        self,
        request_id: str,
        loop: asyncio.AbstractEventLoop,
        on_cancel: Callable[[], None] | None = None,
    ) -> None:
        self.request_id = request_id
        self._loop = loop
        self._events: asyncio.Queue[Delta | Finish] = asyncio.Queue()
        self._cancelled = threading.Event()
        self._on_cancel = on_cancel  # tells the engine, so it never polls every handle
        self._done = False

    def cancel(self) -> None:
        """Stop generating; the engine frees the slot within one step (idempotent)."""
        if not self._cancelled.is_set():
            self._cancelled.set()
            if self._on_cancel is not None:
                self._on_cancel()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def push(self, event: Delta | Finish) -> None:
        """Engine thread -> event loop (one event; the engine batches a step's with Outbox)."""
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancel()

    def deliver(self, event: Delta | Finish) -> None:
        """On the event loop: make `event` the next one the iterator yields."""
        self._events.put_nowait(event)

    def __aiter__(self) -> RequestHandle:
        return self

    async def __anext__(self) -> Delta | Finish:
        if self._done:
            raise StopAsyncIteration
        event = await self._events.get()
        self._done = isinstance(event, Finish)
        return event
