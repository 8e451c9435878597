"""TurboQuant (arXiv:2504.19874, the MSE variant) for the KV cache.

Per vector: its norm, then the unit vector is rotated (`rotation`) so that every coordinate
is ~N(0, 1/d), and each coordinate times sqrt(d) gets the index of its Lloyd-Max level
(`codebook`), packed (`packing`). Stored parts: (codes uint32, norm in the activations'
dtype).

Attention never un-rotates keys: q.k = (q M).(k M) for the orthogonal M, so the queries are
rotated instead; values are linear, so softmax(.) @ (V M) = (softmax(.) @ V) M and the output
is rotated back once per query. Keys and values are dequantized in the rotated frame inside
the attention call only, and only as a table lookup: each vector's norm / sqrt(d) scales its
score (keys) or its probability (values) instead. MLX has no fused lookup-matmul kernel, so
this step expands the codes to the activations' dtype transiently (slower than uniform's
`quantized_matmul` on CPU; see bench/NOTES.md).
"""

from __future__ import annotations

import math

import mlx.core as mx

from .codebook import lloyd_max
from .codec import Mask, Parts, group_queries, masked
from .packing import pack, unpack
from .rotation import rotation


class TurboQuantizer:
    """The scalar quantizer of one bit width, on rotated vectors (last axis d)."""

    def __init__(self, bits: int) -> None:
        levels, thresholds = lloyd_max(bits)
        self.bits = bits
        self.levels = mx.array(levels.astype("float32"))
        self.thresholds = [float(t) for t in thresholds]

    def encode(self, rotated: mx.array) -> Parts:
        """(..., d) rotated vectors -> (codes, norms (..., 1))."""
        x = rotated.astype(mx.float32)
        norm = mx.sqrt(mx.sum(x * x, axis=-1, keepdims=True))
        unit = x * (math.sqrt(x.shape[-1]) / mx.maximum(norm, 1e-30))
        codes = mx.zeros(unit.shape, mx.uint8)
        for t in self.thresholds:  # sorted: the level index is how many thresholds lie below
            codes = codes + (unit > t).astype(mx.uint8)
        return pack(codes, self.bits), norm.astype(rotated.dtype)

    def levels_of(self, codes: mx.array, dtype: mx.Dtype) -> mx.array:
        """The unit-variance level of every coordinate, in `dtype` (the caller applies the
        norm / sqrt(d) scale, where it is cheapest)."""
        return mx.take(self.levels.astype(dtype), unpack(codes, self.bits))

    def decode(self, codes: mx.array, norm: mx.array, dtype: mx.Dtype) -> mx.array:
        """Rotated vectors (..., d) in `dtype`."""
        levels = self.levels_of(codes, dtype)
        return levels * (norm.astype(dtype) * (1 / math.sqrt(levels.shape[-1])))


class TurboQuantCodec:
    def __init__(self, key_bits: int, value_bits: int) -> None:
        self.keys_q, self.values_q = TurboQuantizer(key_bits), TurboQuantizer(value_bits)

    def encode_keys(self, keys: mx.array) -> Parts:
        return self.keys_q.encode(keys @ rotation(keys.shape[-1], keys.dtype))

    def encode_values(self, values: mx.array) -> Parts:
        return self.values_q.encode(values @ rotation(values.shape[-1], values.dtype))

    def attention(
        self, queries: mx.array, keys: Parts, values: Parts, scale: float, mask: Mask
    ) -> mx.array:
        shape, dtype = queries.shape, queries.dtype
        rot, unit = rotation(shape[-1], dtype), 1 / math.sqrt(shape[-1])
        # The per-vector scales multiply the (small) scores and probabilities instead of the
        # full-size keys and values, which stay bare table lookups.
        k = self.keys_q.levels_of(keys[0], dtype)
        v = self.values_q.levels_of(values[0], dtype)
        k_scale = (keys[1].astype(dtype) * (scale * unit)).swapaxes(-1, -2)  # (B, n_kv, 1, T)
        v_scale = (values[1].astype(dtype) * unit).swapaxes(-1, -2)
        q, mask, grouped = group_queries(queries @ rot, mask, k.shape[1], k.shape[2])
        if grouped:
            k, v, k_scale, v_scale = (mx.expand_dims(x, -3) for x in (k, v, k_scale, v_scale))
        scores = masked((q @ k.swapaxes(-1, -2)) * k_scale, mask)
        probs = mx.softmax(scores, axis=-1, precise=True) * v_scale
        return (probs @ v).reshape(shape) @ rot.T
