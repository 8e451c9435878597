"""One request on the engine thread, from admission to Finish: host-side state only.

The device side (prefill cache, batch slot, sampling parameters) is `runner.BatchRunner`'s;
this holds what the host does with each generated token: detokenise, match stop strings
across token boundaries, feed constraints, build the Delta, and decide when to finish.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import structlog

from services.decoder.batch_sampler import Sampled
from services.decoder.options import LogitsOptions
from services.decoder.outbox import Outbox
from services.decoder.stops import StopMatcher
from services.decoder.types import (
    Delta,
    EngineRequest,
    Finish,
    RequestHandle,
    Timings,
    TokenLogprob,
)
from shared.models.registry import PrefillInputs
from shared.runtime.detokenizer import StreamingDetokenizer

__all__ = ["LogitsOptions", "Pending", "Sequence", "read_tokens"]

log = structlog.get_logger("decoder")


class Sequence:
    def __init__(
        self,
        handle: RequestHandle,
        request: EngineRequest,
        max_tokens: int,
        ends: frozenset[int],
        tokenizer: object,
        outbox: Outbox,
    ) -> None:
        self.handle, self.request, self.outbox = handle, request, outbox
        self.prompt_len = len(request.prompt.input_ids)
        self.max_tokens = max_tokens
        self.reserved = self.prompt_len + max_tokens  # KV the scheduler sets aside
        self.prefilled = 0  # prompt tokens already in the KV
        self.prefix_keys = request.prefix_keys  # APC: the prompt's block keys
        self.prefix_blocks: list = []  # APC: matched blocks, referenced until the prefill ends
        self.cached_tokens = 0  # prompt tokens taken from those blocks
        self.slot = -1
        self.ends = ends  # EOS (unless ignore_eos) and stop token ids
        self.detok = StreamingDetokenizer(tokenizer)
        self.stops = StopMatcher(request.stop)
        self.inputs: PrefillInputs | None = None  # set at admission, dropped after prefill
        self.cache: list | None = None  # the prefill's own KVCache, until copied to the slot
        self.generated = 0  # tokens handed to the client side
        self.accepted_drafts = 0  # of those, drafted tokens the target accepted
        self.stop_sequence = ""
        self.error = ""  # why it failed, for Finish
        self.done = False
        self.history = list(request.prompt.input_ids)  # prompt + emitted tokens (drafters)
        self.submitted_ns = time.perf_counter_ns()
        self.admitted_ns = self.first_ns = 0

    @property
    def constrained(self) -> bool:
        return bool(self.request.constraints)

    @property
    def logprobs(self) -> int:
        """-1: none; else how many alternatives to report with each token."""
        return self.request.top_logprobs if self.request.logprobs else -1

    def consume(self, token: int, logprob: TokenLogprob | None) -> str:
        """Take the next generated token; push its Delta; return a finish reason or ""."""
        self.generated += 1
        self.history.append(token)
        if not self.first_ns:
            self.first_ns = time.perf_counter_ns()
        finished_by_constraint = False
        for constraint in self.request.constraints:
            constraint.accept(token)
            finished_by_constraint |= constraint.finished()
        is_end = token in self.ends
        text, hit = self.stops.feed("" if is_end else self.detok.add(token))
        reason, stop_sequence = "", ""
        if hit is not None:
            reason, stop_sequence = "stop", hit
        elif is_end or finished_by_constraint:
            reason = "stop"
        elif self.generated >= self.max_tokens:
            reason = "length"
        if reason and hit is None:  # release what was held back for a possible stop
            tail, hit = self.stops.feed(self.detok.flush())
            text += tail if hit is not None else tail + self.stops.flush()
            stop_sequence = hit or ""
        self.stop_sequence = stop_sequence
        logprobs = (logprob,) if logprob is not None else ()
        self.outbox.add(self.handle, Delta(text, (token,), logprobs))
        return reason

    def finish(self, reason: str, error: str = "") -> Finish:
        self.done = True
        last = time.perf_counter_ns()
        start = self.admitted_ns or last
        timings = Timings(
            queue_ns=start - self.submitted_ns,
            feature_fetch_ns=self.request.feature_fetch_ns,
            prefill_ns=(self.first_ns or last) - start if self.admitted_ns else 0,
            decode_ns=last - self.first_ns if self.first_ns else 0,
        )
        stop = self.stop_sequence if reason == "stop" else ""
        return Finish(
            reason, self.prompt_len, self.generated, stop, timings, error, self.cached_tokens,
            self.accepted_drafts,
        )  # fmt: skip

    def log_finish(self, finish: Finish) -> None:
        t = finish.timings
        log.info(
            "generated", request_id=self.request.request_id, reason=finish.reason,
            prompt_tokens=self.prompt_len, cached_tokens=self.cached_tokens,
            completion_tokens=self.generated,
            queue_ms=t.queue_ns // 1_000_000, prefill_ms=t.prefill_ns // 1_000_000,
            decode_ms=t.decode_ns // 1_000_000,
        )  # fmt: skip

    def release_prefill(self) -> None:
        """The prompt's KV now lives in the batch: let the prefill arrays go."""
        self.inputs = self.cache = None
        self.request.features = []


def token_logprob(
    token: int, logprob: float, ids: list[int] | None, lps: list[float] | None, top: int
) -> TokenLogprob:
    """A TokenLogprob with the `top` most likely alternatives, best first."""
    if not top or ids is None or lps is None:
        return TokenLogprob(token, logprob)
    pairs = sorted(zip(ids, lps, strict=True), key=lambda p: -p[1])[:top]
    return TokenLogprob(token, logprob, tuple(pairs))


Pending = list[tuple[list[tuple[Sequence, int]], Sampled]]  # (sequence, row) pairs + results


def read_tokens(pending: Pending) -> Iterator[tuple[Sequence, int, TokenLogprob | None]]:
    """Read sampled tokens back from the device: (sequence, token, logprob) per row."""
    for rows, sampled in pending:
        tokens = sampled.tokens.tolist()
        chosen = sampled.logprob.tolist() if sampled.logprob is not None else None
        ids = sampled.top_ids.tolist() if sampled.top_ids is not None else None
        lps = sampled.top_lps.tolist() if sampled.top_lps is not None else None
        for seq, row in rows:
            logprob = None
            if chosen is not None and seq.logprobs >= 0:
                top = (ids[row], lps[row]) if ids is not None and lps is not None else (None, None)
                logprob = token_logprob(tokens[row], chosen[row], *top, seq.logprobs)
            yield seq, tokens[row], logprob
