"""`AttendingCache`: a layer cache that computes attention itself.

A quantized cache cannot hand plain key/value arrays to `mx.fast.scaled_dot_product_attention`
(that would mean dequantizing the whole cache every step), so `transformer.Attention` gives it
the new keys, values and queries and takes the attention output back. A nominal base class
(not a structural Protocol) so the per-layer dispatch is one cheap isinstance check.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import mlx.core as mx

from .codec import Mask


class AttendingCache(ABC):
    offset: int  # tokens seen (rotary positions continue from here)

    @abstractmethod
    def attend(
        self, queries: mx.array, keys: mx.array, values: mx.array, scale: float, mask: Mask
    ) -> mx.array:
        """Store the step's (B, n_kv, L, D) keys/values; attention over everything stored."""

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        raise TypeError(
            f"{type(self).__name__} attends itself: call attend(), not update_and_fetch()"
        )

    @property
    @abstractmethod
    def state(self) -> Any: ...

    @property
    @abstractmethod
    def nbytes(self) -> int: ...
