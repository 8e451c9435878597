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
from services.decoder.batch_sampler import BatchSampler, Sampled
from services.decoder.sequence import Sequence
from shared.models.batch_cache import make_batch_caches
from shared.runtime.generate import forward_span, prepare_inputs
from shared.runtime.loaded import LoadedModel


@dataclass
class DecodeStep:
    """A queued batched forward pass, waiting to be sampled."""

    logits: mx.array  # (rows, V)
    live: np.ndarray  # (rows,) bool: rows whose token anybody will read
    index: np.ndarray  # (rows,) each row's output token number


class BatchRunner:
    def __init__(
        self, model: LoadedModel, max_slots: int, sampler: BatchSampler, prefix: PrefixCache
    ) -> None:
        assert model.language is not None
        self.model, self.lm, self.sampler = model, model.language, sampler
        self.prefix = prefix
        self.max_slots = max_slots
        self.layout, self.caches = make_batch_caches(len(self.lm.layers))
        self.occupied = np.zeros(max_slots, bool)
        self.active = np.zeros(max_slots, bool)
        self.lengths = np.zeros(max_slots, np.int64)  # valid KV tokens per slot
        self.deltas = np.zeros(max_slots, np.int64)  # M-RoPE: position = length + delta
        self.index = np.zeros(max_slots, np.int64)  # tokens sampled so far per slot
        self.limit = np.zeros(max_slots, np.int64)  # max_tokens per slot
        self.constrained = np.zeros(max_slots, bool)  # rows whose host must mask each token
        self.tokens: mx.array | None = None  # last sampled token per row
        self._joins: dict[int, mx.array] = {}  # slot -> first token, joining next step

    @property
    def decoding(self) -> int:
        return int(self.active.sum())

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

    def prefill(self, seq: Sequence, n: int) -> mx.array | None:
        """Queue the next `n` prompt tokens; the last position's logits once the prompt is
        complete, else None (then `seq.cache` holds what to evaluate).

        The prompt's last token runs on its own: the tokens before it only fill the cache, so
        MLX never computes the last layer's output path or the LM head for them.
        """
        inputs, cache = seq.inputs, seq.cache
        assert inputs is not None and cache is not None
        start, end = seq.prefilled, seq.prefilled + n
        seq.prefilled = end
        if end < seq.prompt_len:
            forward_span(self.lm, inputs, cache, start, end)
            return None
        if end - start > 1:
            forward_span(self.lm, inputs, cache, start, end - 1)
        return forward_span(self.lm, inputs, cache, end - 1, end)

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
