"""One engine step and the bookkeeping around it, on the engine thread.

`step()`: schedule (admission by slots and KV, prefill chunks sized to the token budget) ->
queue one batched decode step and the prefill chunks (`runner.BatchRunner`) ->
`mx.async_eval` -> postprocess the previous step's tokens (detokenise, stop strings, Deltas)
while this one computes -> hand the step's events to the event loop in one call. Rows with
constraints make the host read token n before sampling n+1; the forward pass of step n+1 is
queued first, so only the sampling waits.

With a drafter (speculative decoding, `services.decoder.spec`) a step that drafts is
synchronous: the host needs every row's tokens to draft and the accepted counts to go on, so
the previous step is read first and this one is read before returning. Each row then emits its
accepted drafts and one more token, consumed one by one (stop strings, EOS and max_tokens end
the row exactly where plain decoding would).
"""

from __future__ import annotations

import threading
import time

import mlx.core as mx
import numpy as np
import structlog

from services.decoder.apc.prefix import PrefixCache
from services.decoder.batch_sampler import BatchSampler
from services.decoder.config import EngineConfig, kv_dtype
from services.decoder.constraints import combined_mask
from services.decoder.outbox import Outbox
from services.decoder.runner import BatchRunner, SpecStep
from services.decoder.scheduler import Scheduler
from services.decoder.sequence import Pending, Sequence, read_tokens, token_logprob
from services.decoder.spec import SpecStats, make_drafter
from services.decoder.types import TokenLogprob
from shared.runtime.loaded import LoadedModel

log = structlog.get_logger("decoder")

SLOW_STEP_S = 1.0  # a step this long is logged with its shapes


class EngineCore:
    def __init__(self, model: LoadedModel, cfg: EngineConfig) -> None:
        self.vocab_size = cfg.vocab_size
        self.prefix = PrefixCache(cfg.prefix, model, kv_dtype(model))
        self.scheduler = Scheduler(
            cfg.max_num_seqs, cfg.max_num_batched_tokens, cfg.kv_tokens, self.prefix.match
        )
        sampler = BatchSampler(cfg.max_num_seqs, cfg.vocab_size, cfg.top_logprobs_k)
        self.drafter = make_drafter(cfg, model)
        self.runner = BatchRunner(
            model, cfg.max_num_seqs, sampler, self.prefix, self.drafter, kv_quant=cfg.kv_quant
        )
        self.spec = SpecStats()
        self.outbox = Outbox()  # the step's events, handed to the event loop in one call
        self.pending: Pending = []  # sampled, not yet read back
        self.lock = threading.Lock()
        self.waiting = 0  # submitted, not admitted yet (guarded by `lock`)
        self.totals = [0, 0, 0]  # prompt tokens, generated tokens, requests

    def has_work(self) -> bool:
        return self.scheduler.has_work() or bool(self.pending)

    def step(self, cancelled: list[Sequence]) -> None:
        """Drop `cancelled`, then schedule -> queue -> postprocess the previous step."""
        start = time.perf_counter()
        chunks = self._step(cancelled)
        if (seconds := time.perf_counter() - start) > SLOW_STEP_S:
            # A stall (on MLX CUDA: kernels built for a new shape) says which shapes it met.
            layout = self.runner.layout
            log.warning(
                "slow_step", seconds=round(seconds, 3), decoding=self.runner.decoding,
                rows=layout.rows, span=layout.span, width=layout.width,
                prefill_chunks=[n for _, n in chunks],
            )  # fmt: skip

    def _step(self, cancelled: list[Sequence]) -> list[tuple[Sequence, int]]:
        for seq in cancelled:
            self.finish(seq, "cancelled")
        chunks = self.scheduler.schedule(self.runner.decode_tokens)
        pending, self.pending = self.pending, []
        queued: list[mx.array] = []
        spec = None
        if self.drafter is not None and (self.runner.active & self.runner.drafts).any():
            self._postprocess(pending)  # drafting needs every row's last token on the host
            pending = []
            spec = self._speculate()
        if spec is not None:
            queued += spec.verified.arrays()
        else:
            pending = self._decode(pending, queued)
        for seq, n in chunks:
            queued += self._prefill(seq, n)
        if queued:
            mx.async_eval(queued)
        if spec is not None:
            self._accept(spec)
        self._postprocess(pending)
        self.prefix.flush()  # before Finish reaches anyone: a finished prompt's blocks are sent
        self.outbox.flush()
        return chunks

    def _decode(self, pending: Pending, queued: list[mx.array]) -> Pending:
        """Queue a plain decode step (one token per row); return what is left to read."""
        decode = self.runner.decode()
        if decode is None:
            return pending
        running = self.scheduler.running
        rows = [(running[r], r) for r in decode.live.nonzero()[0].tolist()]
        masks = None
        if self.runner.constrained[: len(decode.live)][decode.live].any():
            # Constraints need the last token on the host before masking the next one:
            # start the forward pass, then read, then sample (the overlap remains).
            mx.async_eval(decode.logits)
            self._postprocess(pending)
            pending, masks = [], self._masks(rows)
        sampled = self.runner.sample(decode, masks)
        self.pending.append((rows, sampled))
        queued += sampled.arrays()
        return pending

    def _speculate(self) -> SpecStep | None:
        running = self.scheduler.running
        rows = [(running[r], r) for r in np.flatnonzero(self.runner.active).tolist()]
        masks = self._masks(rows) if any(seq.constrained for seq, _ in rows) else None
        return self.runner.speculate(rows, masks)

    def _accept(self, step: SpecStep) -> None:
        """Read the verification, advance the runner, then hand each row its tokens."""
        tokens = np.array(step.verified.tokens)
        accepted = np.array(step.verified.accepted).astype(np.int64)
        accepted = np.where(step.live, accepted, 0)
        self.runner.commit(step, tokens, accepted)
        self.spec.record(step.proposal.counts, accepted, step.live)
        first = _first_logprobs(step)
        for seq, row in step.rows:
            for j in range(int(accepted[row]) + 1):
                if seq.done:
                    break
                seq.accepted_drafts += j < accepted[row]  # tokens 0..a-1 were drafts
                logprob = first(seq, row) if j == 0 else None
                try:
                    reason = seq.consume(int(tokens[row, j]), logprob)
                except Exception as exc:  # noqa: BLE001 - e.g. a constraint: fails its request
                    reason = self._failed(seq, exc)
                if reason:
                    self.finish(seq, reason)

    def _prefill(self, seq: Sequence, n: int) -> list[mx.array]:
        if not seq.admitted_ns:
            try:
                self._admit(seq)
            except Exception as exc:  # noqa: BLE001 - a bad prompt fails alone
                self.finish(seq, self._failed(seq, exc))
                return []
        logits = self.runner.prefill(seq, n)
        if logits is None:  # more chunks to come: evaluate this one now, interleaved
            return [t for c in seq.cache or [] for t in c.state]
        mask = self._mask(seq) if seq.constrained else None
        if seq.done:  # its constraint failed
            return []
        blocks = self.prefix.store(seq, seq.cache or [])
        sampled = self.runner.first_token(seq, logits, mask)
        self.scheduler.prefill_done(seq)
        self.pending.append(([(seq, 0)], sampled))
        return sampled.arrays() + blocks

    def _admit(self, seq: Sequence) -> None:
        seq.admitted_ns = time.perf_counter_ns()
        with self.lock:
            self.waiting -= 1
        self.totals[0] += seq.prompt_len
        self.runner.start(seq)

    def _masks(self, rows: list[tuple[Sequence, int]]) -> dict[int, np.ndarray] | None:
        masks = {}
        for seq, row in rows:
            if seq.constrained and not seq.done and (mask := self._mask(seq)) is not None:
                masks[row] = mask
        return masks or None

    def _postprocess(self, pending: Pending) -> None:
        """Hand each row its token (this reads the device); finish the rows that end."""
        for seq, token, logprob in read_tokens(pending):
            if seq.done:
                continue
            try:
                reason = seq.consume(token, logprob)
            except Exception as exc:  # noqa: BLE001 - e.g. a constraint: fails its request only
                reason = self._failed(seq, exc)
            if reason:
                self.finish(seq, reason)

    def _mask(self, seq: Sequence) -> np.ndarray | None:
        """The row's allowed tokens (None: all); a constraint that raises fails its request."""
        try:
            return combined_mask(seq.request.constraints, self.vocab_size)
        except Exception as exc:  # noqa: BLE001
            self.finish(seq, self._failed(seq, exc))
            return None

    def _failed(self, seq: Sequence, exc: Exception) -> str:
        log.exception("request_failed", request_id=seq.request.request_id)
        seq.error = f"{type(exc).__name__}: {exc}"
        return "error"

    def finish(self, seq: Sequence, reason: str, error: str = "") -> None:
        """Free the slot and KV before the caller sees Finish, so stats never lag behind."""
        if seq.done:
            return
        error = error or seq.error
        self.prefix.release(seq)
        if seq.slot >= 0:
            self.runner.release(seq.slot)
        elif not seq.admitted_ns:
            with self.lock:
                self.waiting -= 1
        self.scheduler.free(seq)
        finish = seq.finish(reason, error)
        if seq.admitted_ns:
            self.totals[1] += seq.generated
            self.totals[2] += 1
            seq.log_finish(finish)
        self.outbox.add(seq.handle, finish)


def _first_logprobs(step: SpecStep):  # noqa: ANN202 - a small closure
    """Logprobs of position 0 (rows that ask never draft, so it is their only token)."""
    first = step.verified.first
    if first.logprob is None:
        return lambda seq, row: None
    chosen, tokens = first.logprob.tolist(), first.tokens.tolist()
    ids = first.top_ids.tolist() if first.top_ids is not None else None
    lps = first.top_lps.tolist() if first.top_lps is not None else None

    def read(seq: Sequence, row: int) -> TokenLogprob | None:
        if seq.logprobs < 0:
            return None
        top = (ids[row], lps[row]) if ids is not None and lps is not None else (None, None)
        return token_logprob(tokens[row], chosen[row], *top, seq.logprobs)

    return read
