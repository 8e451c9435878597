"""Bookkeeping shared by the drafters that run a model of their own over a slot batch cache
(the draft model and the EAGLE-3 head): how many positions each slot's cache holds, which
slots are live, the positions of a wide or one-token step, the proposal they return, and
the rollback after verification."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from services.decoder.spec.base import Proposal
from shared.models.batch_cache import make_batch_caches


class SlotDrafter:
    def __init__(self, k: int, max_slots: int, num_layers: int) -> None:
        self.k, self.max_slots = k, max_slots
        self.layout, self.caches = make_batch_caches(num_layers)
        self.lengths = np.zeros(max_slots, np.int64)  # positions in each slot's cache
        self.occupied = np.zeros(max_slots, bool)
        # The last proposal's (lengths before it, positions fed, drafting rows), for `accepted`.
        self._last: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def release(self, slot: int) -> None:
        self.lengths[slot], self.occupied[slot] = 0, False
        if not self.occupied.any():  # the last row left: give the cache memory back
            self.layout.reset()
            for cache in self.caches:
                cache.release()

    def _wide_positions(self, before: np.ndarray, width: int) -> mx.array:
        """Set up a step of `width` positions per row after `before` and return their ids."""
        self.layout.begin(before, self.max_slots, width)
        return mx.array((before[:, None] + np.arange(width)[None, :]).astype(np.int32))

    def _next_positions(self, n: int) -> mx.array:
        """Set up a one-token step for rows [0, n) at their current lengths; (n, 1) ids."""
        self.layout.begin(self.lengths[:n], self.max_slots)
        return mx.array(self.lengths[:n, None].astype(np.int32))

    def _proposal(
        self,
        drafts: list[mx.array],
        qs: list[mx.array | None],
        caps: np.ndarray,
        drafting: np.ndarray,
        sampled: np.ndarray,
    ) -> Proposal:
        """k drafts for each drafting row (at most its cap); q only when some row sampled."""
        counts = np.where(drafting, np.minimum(caps, self.k), 0)
        q = mx.stack(qs, axis=1) if sampled.any() else None  # type: ignore[arg-type]
        return Proposal(mx.stack(drafts, axis=1), counts, q, sampled)

    def _roll_back(self, keep: np.ndarray) -> None:
        """Drafting rows of the last proposal keep `keep` positions; the rest stay as they are."""
        assert self._last is not None
        _, _, drafting = self._last
        n = len(drafting)
        self.lengths[:n] = np.where(drafting, keep, self.lengths[:n])
        self._last = None
