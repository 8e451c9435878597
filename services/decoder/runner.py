"""The device side of the batch: slot KV caches, each slot's position, the last tokens.

A request's prompt is prefilled alone (B=1, its own KVCache, in chunks the scheduler sizes),
then its KV is copied into its slot and it joins the batched decode at the next step. Decode
steps run rows [0, highest occupied slot]; per-slot numpy vectors say where each row writes
(`lengths`), its rotary position (`lengths + deltas`: M-RoPE rows carry their delta) and
whether it still decodes (`active`). Rows that are free, prefilling or done compute garbage
nobody reads. Everything here is queued lazily; the engine decides when to evaluate.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from services.decoder.apc.prefix import PrefixCache
from services.decoder.batch_sampler import BatchSampler, Sampled, Verified
from services.decoder.sequence import Sequence
from services.decoder.spec.base import Drafter, Proposal, drafter_on
from shared.models.kv_quant import KVQuantConfig, make_batch_caches
from shared.runtime.generate import forward_span, prepare_inputs
from shared.runtime.loaded import LoadedModel


@dataclass
class DecodeStep:
    """A queued batched forward pass, waiting to be sampled."""

    logits: mx.array  # (rows, V)
    live: np.ndarray  # (rows,) bool: rows whose token anybody will read
    index: np.ndarray  # (rows,) each row's output token number


@dataclass
class SpecStep:
    """A queued speculative step: each row's last token + its drafts in one forward pass."""

    verified: Verified
    proposal: Proposal
    live: np.ndarray  # (rows,) bool: rows whose tokens anybody will read
    rows: list[tuple[Sequence, int]]  # the decoding sequences and their rows
    aux: list[mx.array]  # EAGLE-3: the target's captured hidden states, (rows, W, H) each


class BatchRunner:
    def __init__(
        self,
        model: LoadedModel,
        max_slots: int,
        sampler: BatchSampler,
        prefix: PrefixCache,
        drafter: Drafter | None = None,
        kv_quant: KVQuantConfig | None = None,
    ) -> None:
        assert model.language is not None
        self.model, self.lm, self.sampler = model, model.language, sampler
        self.prefix = prefix
        self.max_slots = max_slots
        # Quantized / windowed slot caches (#7); prefill stays on full-precision KVCache.
        kv_cfg = kv_quant or KVQuantConfig()
        self.layout, self.caches = make_batch_caches(len(self.lm.layers), kv_cfg)
        self.occupied = np.zeros(max_slots, bool)
        self.active = np.zeros(max_slots, bool)
        self.lengths = np.zeros(max_slots, np.int64)  # valid KV tokens per slot
        self.deltas = np.zeros(max_slots, np.int64)  # M-RoPE: position = length + delta
        self.index = np.zeros(max_slots, np.int64)  # tokens sampled so far per slot
        self.limit = np.zeros(max_slots, np.int64)  # max_tokens per slot
        self.constrained = np.zeros(max_slots, bool)  # rows whose host must mask each token
        self.drafter = drafter  # speculative decoding (None: off)
        self.drafts = np.zeros(max_slots, bool)  # rows that may draft (see `start`)
        self.draft_cap = np.zeros(max_slots, np.int64)  # drafts per step per row (request's)
        # EAGLE-3 reads the target's hidden states entering a few layers, every forward pass.
        self.taps = drafter.aux_layers if drafter is not None else ()
        if self.taps:
            self.lm.model.capture(self.taps)  # type: ignore[attr-defined]
        self.tokens: mx.array | None = None  # last sampled token per row
        self._joins: dict[int, mx.array] = {}  # slot -> first token, joining next step

    @property
    def decoding(self) -> int:
        return int(self.active.sum())

    @property
    def decode_tokens(self) -> int:
        """Tokens the decoding rows take from a step's budget: 1 each, plus the drafts a
        drafting row may verify."""
        k = self.drafter.k if self.drafter is not None else 0
        drafting = self.active & self.drafts
        return self.decoding + int(np.minimum(self.draft_cap[drafting], k).sum())

    def start(self, seq: Sequence) -> None:
        """Admission: embed the prompt (media merged), make its prefill cache and slot."""
        req = seq.request
        seq.inputs = prepare_inputs(self.model, req.prompt, req.features)
        seq.cache = self.lm.make_cache()
        self.prefix.load(seq, seq.cache)  # the cached leading blocks, if admission matched any
        slot = seq.slot
        # min_tokens holds back every way of ending: EOS and the request's stop token ids.
        options = dataclasses.replace(req.logits, banned_until_min=seq.ends)
        self.sampler.add(slot, req.sampling, options, req.prompt.input_ids, seq.logprobs)
        self.occupied[slot], self.active[slot] = True, False
        self.lengths[slot] = self.index[slot] = 0
        self.deltas[slot], self.limit[slot] = seq.inputs.rope_delta, seq.max_tokens
        self.constrained[slot] = seq.constrained
        # Constrained rows need the host's mask before every token, and logprob rows one
        # report per token: both decode without drafting (in the same batch).
        self.drafts[slot] = (
            drafter_on(self.drafter) and req.speculative and not seq.constrained
        ) and seq.logprobs < 0
        self.draft_cap[slot] = req.num_draft_tokens or (self.drafter.k if self.drafter else 0)

    def prefill(self, seq: Sequence, n: int) -> mx.array | None:
        """Queue the next `n` prompt tokens; the last position's logits once the prompt is
        complete, else None (then `seq.cache` holds what to evaluate).

        The prompt's last token runs on its own: the tokens before it only fill the cache, so
        MLX never computes the last layer's output path or the LM head for them.
        """
        inputs, cache = seq.inputs, seq.cache
        assert inputs is not None and cache is not None
        # A chunk may run past the scheduler's `n` to an image's end (`chunk_end`, Gemma 3).
        start, end = seq.prefilled, inputs.chunk_end(seq.prefilled + n)
        seq.prefilled = end
        if end < seq.prompt_len:
            self._span(seq, start, end)
            return None
        if end - start > 1:
            self._span(seq, start, end - 1)
        return self._span(seq, end - 1, end)

    def _span(self, seq: Sequence, start: int, end: int) -> mx.array:
        assert seq.inputs is not None and seq.cache is not None
        logits = forward_span(self.lm, seq.inputs, seq.cache, start, end)
        if self.taps and self.drafts[seq.slot]:  # EAGLE-3 drafts from the prompt's states too
            self.drafter.prefill_chunk(seq.slot, self.lm.model.captured)  # type: ignore[union-attr]
        return logits

    def first_token(self, seq: Sequence, logits: mx.array, mask: np.ndarray | None) -> Sampled:
        """Sample the prompt's next token and move its KV into the slot; it decodes next step."""
        slot = seq.slot
        masks = {0: mask} if mask is not None else None
        out = self.sampler.sample(
            logits[:, -1, :], np.array([slot]), np.zeros(1, np.int64), None, masks
        )
        assert seq.cache is not None
        self.layout.reserve(slot, seq.prompt_len, self.max_slots)
        for batch_cache, own in zip(self.caches, seq.cache, strict=True):
            batch_cache.insert(slot, *own.state)
        seq.release_prefill()
        if self.drafter is not None and self.drafts[slot]:
            self.drafter.start(slot, seq.request.prompt.input_ids)
        self.lengths[slot], self.index[slot] = seq.prompt_len, 1
        self.active[slot] = self.limit[slot] > 1
        self._joins[slot] = out.tokens
        return out

    def decode(self) -> DecodeStep | None:
        """Queue one forward pass over every row; None when no row decodes."""
        if not self.active.any():
            return None
        rows = int(np.flatnonzero(self.occupied)[-1]) + 1
        lengths = self.lengths[:rows]
        self.layout.begin(lengths, self.max_slots)
        positions = mx.array((lengths + self.deltas[:rows]).astype(np.int32))[:, None]
        tokens = self._inputs(rows)
        logits = self.lm(tokens[:, None], self.caches, position_ids=positions)[:, -1, :]
        live, index = self.active[:rows].copy(), self.index[:rows].copy()
        self.lengths[:rows] += live
        self.index[:rows] += live
        self.active[:rows] &= self.index[:rows] < self.limit[:rows]
        return DecodeStep(logits, live, index)

    def sample(self, step: DecodeStep, masks: dict[int, np.ndarray] | None) -> Sampled:
        rows = len(step.live)
        out = self.sampler.sample(step.logits, np.arange(rows), step.index, step.live, masks)
        self.tokens = out.tokens
        return out

    def release(self, slot: int) -> None:
        """Drop a slot's state; its KV stays in the buffers as garbage until reused."""
        self.occupied[slot] = self.active[slot] = self.constrained[slot] = False
        if self.drafter is not None and self.drafts[slot]:
            self.drafter.release(slot)
        self.drafts[slot] = False
        self.lengths[slot] = self.deltas[slot] = self.index[slot] = 0
        self._joins.pop(slot, None)
        self.sampler.remove(slot)
        if not self.occupied.any():  # nothing left: give the memory back
            self.layout.reset()
            for cache in self.caches:
                cache.release()
            self.tokens = None
        else:  # after a long row: the caches copy into less memory at their next write
            self.layout.shrink(int(self.lengths.max()))

    def speculate(
        self, rows: list[tuple[Sequence, int]], masks: dict[int, np.ndarray] | None
    ) -> SpecStep | None:
        """Queue a verification step (last token + drafts per row, width 1 + K) when some
        row drafts; None otherwise. The host must know every row's tokens (`seq.history`)."""
        assert self.drafter is not None
        if not (self.active & self.drafts).any():  # e.g. the rows just read have all ended
            return None
        n = int(np.flatnonzero(self.occupied)[-1]) + 1
        by_row: list[Sequence | None] = [None] * n
        for seq, row in rows:
            by_row[row] = None if seq.done else seq
        caps = np.where(self.active[:n] & self.drafts[:n], self.limit[:n] - self.index[:n] - 1, 0)
        caps = np.minimum(np.maximum(caps, 0), np.minimum(self.draft_cap[:n], self.drafter.k))
        if not caps.any():
            return None
        slots = np.arange(n)
        prop = self.drafter.propose(
            by_row, caps, self.index[:n], self.sampler.seed[:n], self.sampler.temp[:n]
        )
        if not prop.counts.any():
            self.drafter.accepted(np.zeros(n, np.int64))
            return None
        width = 1 + prop.drafts.shape[1]
        last = np.array([s.history[-1] if s is not None else 0 for s in by_row], np.int32)
        tokens = mx.concatenate([mx.array(last)[:, None], prop.drafts], axis=1)
        lengths = self.lengths[:n]
        self.layout.begin(lengths, self.max_slots, width)
        pos = (lengths + self.deltas[:n])[:, None] + np.arange(width)[None, :]
        logits = self.lm(tokens, self.caches, position_ids=mx.array(pos.astype(np.int32)))
        verified = self.sampler.verify(
            logits, slots, self.index[:n], prop.drafts, prop.counts, masks, prop.q, prop.sampled
        )
        self._joins.clear()  # their first tokens came from the host (`last`)
        aux = list(self.lm.model.captured) if self.taps else []  # type: ignore[attr-defined]
        return SpecStep(verified, prop, self.active[:n].copy(), rows, aux)

    def commit(self, step: SpecStep, tokens: np.ndarray, accepted: np.ndarray) -> None:
        """Advance every live row by the tokens it emits (accepted drafts + one)."""
        assert self.drafter is not None
        n, live = len(step.live), step.live
        self.drafter.accepted(accepted)
        if self.taps:
            self.drafter.observe(step.aux, accepted, live)  # type: ignore[attr-defined]
        emit = np.where(live, accepted + 1, 0)
        self.lengths[:n] += emit
        self.index[:n] += emit
        self.active[:n] &= self.index[:n] < self.limit[:n]
        last = tokens[np.arange(n), accepted] * live
        self.tokens = mx.array(last.astype(np.int32))
        rows = np.repeat(np.arange(n), emit)
        cols = np.concatenate([np.arange(e) for e in emit]) if len(rows) else rows
        self.sampler.count(rows, tokens[rows, cols])

    def _inputs(self, rows: int) -> mx.array:
        """Each row's input token: its last sampled one, or its first one if it just joined."""
        y = self.tokens
        if y is None:
            y = mx.zeros((rows,), mx.int32)
        elif y.shape[0] < rows:
            y = mx.concatenate([y, mx.zeros((rows - y.shape[0],), mx.int32)])
        elif y.shape[0] > rows:
            y = y[:rows]
        if self._joins:
            slots = mx.array(list(self._joins))
            y[slots] = mx.concatenate(list(self._joins.values()))
            self._joins.clear()
        return y
