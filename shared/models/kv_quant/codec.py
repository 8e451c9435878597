"""How one layer's keys and values are stored and attended: the `KVCodec` contract.

A codec turns (B, n_kv, T, D) keys or values into `Parts`, a tuple of arrays that all keep
the token axis at -2 (so caches can slice, scatter and resize every part alike without
knowing what it holds), and computes attention straight from those parts.
"""

from __future__ import annotations

from typing import Protocol

import mlx.core as mx

Parts = tuple[mx.array, ...]
Mask = str | mx.array | None


class KVCodec(Protocol):
    def encode_keys(self, keys: mx.array) -> Parts: ...

    def encode_values(self, values: mx.array) -> Parts: ...

    def attention(
        self, queries: mx.array, keys: Parts, values: Parts, scale: float, mask: Mask
    ) -> mx.array: ...


class FullPrecision:
    """Keys and values as they come (a window cache without quantization)."""

    def encode_keys(self, keys: mx.array) -> Parts:
        return (keys,)

    def encode_values(self, values: mx.array) -> Parts:
        return (values,)

    def attention(
        self, queries: mx.array, keys: Parts, values: Parts, scale: float, mask: Mask
    ) -> mx.array:
        return mx.fast.scaled_dot_product_attention(
            queries, keys[0], values[0], scale=scale, mask=mask
        )


def group_queries(
    queries: mx.array, mask: Mask, n_kv: int, n_keys: int
) -> tuple[mx.array, mx.array | None, bool]:
    """Grouped-query attention without repeating the KV: (B, n_q, L, D) queries become
    (B, n_kv, repeats, L, D) and the mask an explicit one to match; True when grouped, and
    then every KV part needs `mx.expand_dims(part, -3)` to broadcast over the repeats."""
    b, n_q, length, dim = queries.shape
    mask = bool_mask(mask, length, n_keys)
    if n_q == n_kv:
        return queries, mask, False
    queries = queries.reshape(b, n_kv, n_q // n_kv, length, dim)
    if mask is not None and mask.ndim == 4:  # (B, 1, L, T) -> (B, 1, 1, L, T)
        mask = mx.expand_dims(mask, 2)
    return queries, mask, True


def fold_queries(
    queries: mx.array, mask: Mask, n_kv: int, n_keys: int
) -> tuple[mx.array, mx.array | None]:
    """Grouped-query attention with each KV head's query heads as more query rows: (B, n_q,
    L, D) -> (B, n_kv, n_q / n_kv * L, D), the mask repeated to match, so the KV needs no
    broadcast batch axis (MLX 0.32's CUDA 8-bit quantized_matmul has no kernel for one query
    row broadcast over the repeats: "No implementation for problem shape 1x...x28"). The
    output (B, n_kv, rows, D) reshapes straight back to (B, n_q, L, D)."""
    b, n_q, length, dim = queries.shape
    mask = bool_mask(mask, length, n_keys)
    repeats = n_q // n_kv
    if repeats == 1:
        return queries, mask
    queries = queries.reshape(b, n_kv, repeats * length, dim)
    if mask is not None:  # (..., L, T) -> (..., repeats * L, T), query row r * L + l
        lead = mask.shape[:-2]
        mask = mx.broadcast_to(mx.expand_dims(mask, -3), (*lead, repeats, length, n_keys))
        mask = mask.reshape(*lead, repeats * length, n_keys)
    return queries, mask


def masked(scores: mx.array, mask: mx.array | None) -> mx.array:
    if mask is None:
        return scores
    if mask.dtype == mx.bool_:
        return mx.where(mask, scores, mx.finfo(scores.dtype).min)
    return scores + mask  # additive


def bool_mask(mask: Mask, queries: int, keys: int) -> mx.array | None:
    """An explicit boolean mask: MLX's "causal" string is lower-right aligned (the last query
    sees every key), which is what a chunk appended after cached tokens needs."""
    if not isinstance(mask, str):
        return mask
    q_pos = mx.arange(keys - queries, keys)
    return q_pos[:, None] >= mx.arange(keys)[None]
