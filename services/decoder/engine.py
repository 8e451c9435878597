"""The decoder engine: continuous batching on one dedicated MLX thread, results as async events.

`submit` validates and queues a request (bounded: full -> OverloadedError before anything is
streamed) and returns a RequestHandle, an async iterator of Delta events and one Finish. The
engine thread loops `step()`: schedule (admit by KV budget and slots, size prefill chunks to
the per-step token budget) -> run (one batched decode step for every decoding row, plus the
prefill chunks) -> postprocess the previous step's tokens while this one computes. Requests
join at the next step and leave the moment they finish or are cancelled.
"""

from __future__ import annotations

import asyncio
import queue
from collections import deque
from concurrent.futures import Future

import structlog

from services.decoder.config import EngineConfig
from services.decoder.core import EngineCore
from services.decoder.options import LogitsOptions
from services.decoder.sequence import Sequence
from services.decoder.types import (
    Delta,
    EngineRequest,
    EngineStats,
    Finish,
    RequestHandle,
    TokenLogprob,
)
from services.decoder.validate import validate
from shared.errors import BackendUnavailableError, OverloadedError
from shared.runtime import mlx_thread
from shared.runtime.loaded import LoadedModel

log = structlog.get_logger("decoder")

__all__ = [
    "DecoderEngine",
    "Delta",
    "EngineConfig",
    "EngineRequest",
    "EngineStats",
    "Finish",
    "LogitsOptions",
    "RequestHandle",
    "TokenLogprob",
]

_STOP, _WAKE = object(), object()


class DecoderEngine:
    def __init__(
        self,
        model: LoadedModel,
        model_id: str,
        config: EngineConfig | None = None,
        *,
        worker: mlx_thread.MLXWorker | None = None,
        **overrides: int | str | None,
    ) -> None:
        if model.language is None:
            raise ValueError("the decoder needs the language model (components=['language'])")
        self.model, self.model_id = model, model_id
        self.config = cfg = (config or EngineConfig()).resolve(model, **overrides)
        self.max_model_len, self.vocab_size = cfg.max_model_len, cfg.vocab_size
        self.max_waiting = cfg.max_waiting
        self.core = EngineCore(model, cfg)
        self.scheduler, self.runner = self.core.scheduler, self.core.runner
        self.prefix = self.core.prefix
        self._worker = worker or mlx_thread.worker()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._cancels: deque[Sequence] = deque()  # appended from any thread
        self._loop_future: Future | None = None
        self._closed = False

    def start(self) -> None:
        """Occupy the MLX thread with the engine loop (nothing else may use it until shutdown)."""
        self._loop_future = self._worker.submit(self._loop)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Cancel what is queued or running and stop the loop."""
        self._closed = True
        self._inbox.put(_STOP)
        if self._loop_future is not None:
            self._loop_future.result(timeout)

    def stats(self) -> EngineStats:
        kv, totals = self.scheduler.kv, self.core.totals
        return EngineStats(
            running=self.scheduler.num_admitted,
            waiting=self.core.waiting,
            kv_tokens=kv.used,
            max_model_len=self.max_model_len,
            prompt_tokens_total=totals[0],
            generation_tokens_total=totals[1],
            requests_total=totals[2],
            kv_usage=kv.used / kv.capacity if kv.capacity else 0.0,
            spec_num_drafts=self.core.spec.steps,
            spec_num_draft_tokens=self.core.spec.drafted,
            spec_num_accepted_tokens=self.core.spec.accepted,
        )

    def submit(self, request: EngineRequest) -> RequestHandle:
        """Validate and queue; call from the event loop. Raises before anything is queued."""
        if self._closed or self._loop_future is None or self._loop_future.done():
            raise BackendUnavailableError("the decoder is not running (shutting down?)")
        max_tokens = validate(request, self.config)
        # The engine learns of a cancel through this callback (it never polls every handle).
        loop = asyncio.get_running_loop()
        handle = RequestHandle(request.request_id, loop, on_cancel=lambda: self._cancelled(seq))
        with self.core.lock:
            if self.core.waiting >= self.max_waiting:
                raise OverloadedError(f"the decoder queue is full ({self.max_waiting} waiting)")
            self.core.waiting += 1
        eos = frozenset() if request.ignore_eos else self.model.eos_token_ids
        ends = eos | request.stop_token_ids
        seq = Sequence(handle, request, max_tokens, ends, self.model.tokenizer, self.core.outbox)
        if window := self.config.kv_quant.max_kv_size:  # the slot never holds more than that
            seq.reserved = min(seq.reserved, window)
        self._inbox.put(seq)
        return handle

    def _cancelled(self, seq: Sequence) -> None:  # any thread
        self._cancels.append(seq)
        self._inbox.put(_WAKE)

    # ---- the engine thread ----------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while self._take_inbox(block=not self.core.has_work()):
                if self.core.has_work():
                    self._safe_step()
        finally:
            self._abort_all("cancelled", "the decoder is shutting down")

    def _take_inbox(self, block: bool) -> bool:
        """Move submitted requests to the scheduler; False once shutdown was asked."""
        try:
            item = self._inbox.get() if block else self._inbox.get_nowait()
            while True:
                if item is _STOP:
                    return False
                if isinstance(item, Sequence) and not item.done:  # done: cancelled early
                    self.scheduler.add(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            return True

    def _safe_step(self) -> None:
        cancelled = []
        while self._cancels:
            cancelled.append(self._cancels.popleft())
        try:
            self.core.step(cancelled)
        except Exception as exc:  # noqa: BLE001 - one bad step never stops the loop
            log.exception("step_failed")
            self.core.pending = []
            self._abort_all("error", f"{type(exc).__name__}: {exc}", waiting=False)

    def _abort_all(self, reason: str, error: str, waiting: bool = True) -> None:
        """Finish every admitted request (and, with `waiting`, every queued one)."""
        sched = self.core.scheduler
        seqs = list(sched.prefilling) + list(sched.running.values())
        if waiting:
            seqs += list(sched.waiting)
            while True:
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if isinstance(item, Sequence):
                    seqs.append(item)
        for seq in seqs:
            self.core.finish(seq, reason, error)
        self.core.outbox.flush()
