"""The rotating window (`--max-kv-size`): where each token of a sequence lives in its cache.

A window of `size` slots keeps the sequence's first `keep` tokens (attention sinks) for good
and cycles the others through the remaining `size - keep` slots, like mlx-lm's
RotatingKVCache: token t sits at slot t until the window is full, then at
keep + (t - keep) % (size - keep), overwriting the token `size - keep` before it. Keys carry
their rotary position already, so attention does not care about slot order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Window:
    size: int
    keep: int

    def slot(self, token: np.ndarray) -> np.ndarray:
        """The slot of token index `token` (array or int)."""
        ring = self.keep + (token - self.keep) % (self.size - self.keep)
        return np.where(token < self.size, token, ring)

    def stored(self, length: int) -> int:
        return min(length, self.size)

    def order(self, length: int) -> np.ndarray | None:
        """For a sequence of `length` tokens: the token held by each slot (None: identity)."""
        if length <= self.size:
            return None
        tail = np.arange(length - (self.size - self.keep), length)
        order = np.arange(self.size)
        order[self.slot(tail)] = tail
        return order
