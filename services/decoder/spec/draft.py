"""Draft-model speculation: a small language model sharing the target's tokenizer proposes
k tokens per row, in the decoder process, with its own slot batch cache.

The drafter's cache holds `lengths[slot]` tokens of the row's history (prompt + emitted
tokens). Each step it first feeds what it lacks (normally the last emitted token; two tokens
after a step that accepted every draft, whose last draft it never ran; more after steps the
row did not draft), one wide step for all rows, then k - 1 one-token steps, each feeding the
previous draft. After verification a row keeps the drafts the target accepted: its length is
lowered past the rest, which become garbage (see `shared.models.batch_cache`).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from services.decoder.batch_sampler import gumbel_noise
from services.decoder.spec.base import Proposal, Row
from services.decoder.spec.rejection import DRAFT_SALT
from services.decoder.spec.slots import SlotDrafter


class DraftModelProposer(SlotDrafter):
    """`lengths[slot]`: history tokens in the slot's KV."""

    kind = "draft"
    aux_layers: tuple[int, ...] = ()

    def __init__(self, lm: object, num_draft_tokens: int, max_slots: int, vocab: int) -> None:
        super().__init__(num_draft_tokens, max_slots, len(lm.layers))  # type: ignore[attr-defined]
        self.lm, self.vocab = lm, vocab

    def start(self, slot: int, prompt_ids: list[int]) -> None:
        """Prefill the prompt alone (the drafter is small) and move its KV into the slot."""
        cache = self.lm.make_cache()  # type: ignore[attr-defined]
        self.lm(mx.array([prompt_ids]), cache)  # type: ignore[operator]
        self.layout.reserve(slot, len(prompt_ids), self.max_slots)
        for batch_cache, own in zip(self.caches, cache, strict=True):
            batch_cache.insert(slot, *own.state)
        self.lengths[slot], self.occupied[slot] = len(prompt_ids), True

    def propose(
        self,
        rows: list[Row | None],
        caps: np.ndarray,
        index: np.ndarray,
        seeds: np.ndarray,
        temps: np.ndarray,
    ) -> Proposal:
        n = len(rows)
        drafting = np.array([r is not None and c > 0 for r, c in zip(rows, caps, strict=True)])
        before = self.lengths[:n].copy()
        feeds = [
            row.history[int(before[i]) :] if drafting[i] and row is not None else []
            for i, row in enumerate(rows)
        ]
        fed = np.array([len(f) for f in feeds], np.int64)
        logits = self._feed(feeds, before, int(fed.max()))
        last = logits[mx.arange(n), mx.array(np.maximum(fed - 1, 0))]
        self.lengths[:n] += fed
        sampled = drafting & (temps > 0)
        drafts, qs = [], []
        for j in range(self.k):
            if j:
                pos = self._next_positions(n)
                last = self.lm(drafts[-1][:, None], self.caches, position_ids=pos)[:, 0]  # type: ignore[operator]
                self.lengths[:n] += drafting
            token, q = pick(last, np.where(sampled, temps, 0.0), seeds, index + 1 + j, self.vocab)
            drafts.append(token)
            qs.append(q)
        self._last = (before, fed, drafting)
        return self._proposal(drafts, qs, caps, drafting, sampled)

    def accepted(self, accepted: np.ndarray) -> None:
        """Keep the fed tokens and the accepted drafts the drafter itself ran (all but the
        last: it was proposed, never fed)."""
        assert self._last is not None
        before, fed, _ = self._last
        self._roll_back(before + fed + np.minimum(accepted[: len(before)], self.k - 1))

    def _feed(self, feeds: list[list[int]], before: np.ndarray, width: int) -> mx.array:
        """One step of `width` tokens per row: what each row's cache lacks, right-padded."""
        width = max(width, 1)
        tokens = np.zeros((len(feeds), width), np.int32)
        for i, f in enumerate(feeds):
            tokens[i, : len(f)] = f
        pos = self._wide_positions(before, width)
        return self.lm(mx.array(tokens), self.caches, position_ids=pos)  # type: ignore[operator]


def pick(
    logits: mx.array,
    temps: np.ndarray,
    seeds: np.ndarray,
    index: np.ndarray,
    vocab: int,
    d2t: mx.array | None = None,
) -> tuple[mx.array, mx.array | None]:
    """Drafts from (rows, V') drafter logits: greedy for rows with temperature 0; the others
    draw from q = softmax(logits / T) (their own noise stream) and return q over the target's
    `vocab` for the rejection rule. `d2t` maps a smaller draft vocabulary to target ids
    (EAGLE-3: target = draft + d2t[draft]); without it ids beyond `vocab` are cut."""
    if d2t is None:
        logits = logits[:, :vocab]
    logits = logits.astype(mx.float32)
    greedy = mx.argmax(logits, axis=-1).astype(mx.int32)
    sampled = temps > 0
    if not sampled.any():
        return _to_target(greedy, d2t), None
    lq = logits / mx.array(np.where(sampled, temps, 1.0).astype(np.float32))[:, None]
    lq = lq - mx.logsumexp(lq, axis=-1, keepdims=True)
    noise = gumbel_noise(seeds ^ np.uint32(DRAFT_SALT), index, lq.shape[-1])
    drawn = mx.argmax(lq + noise, axis=-1).astype(mx.int32)
    tokens = _to_target(mx.where(mx.array(sampled), drawn, greedy), d2t)
    q = mx.exp(lq)
    if d2t is not None:  # scatter the draft vocabulary's mass onto its target ids
        ids = mx.arange(q.shape[-1]) + d2t
        q = mx.zeros((q.shape[0], vocab), q.dtype).at[:, ids].add(q)
    elif q.shape[-1] < vocab:  # a smaller vocabulary never proposes the rest
        q = mx.pad(q, [(0, 0), (0, vocab - q.shape[-1])])
    return tokens, q


def _to_target(ids: mx.array, d2t: mx.array | None) -> mx.array:
    return ids if d2t is None else ids + d2t[ids]
