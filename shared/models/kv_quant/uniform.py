"""Uniform (affine) KV quantization: MLX's `mx.quantize` per `group_size` values, attention
read through `mx.quantized_matmul` (mlx-lm `quantized_scaled_dot_product_attention`): the
packed keys and values are never expanded to full precision."""

from __future__ import annotations

import mlx.core as mx

from .codec import Mask, Parts, group_queries, masked


class UniformCodec:
    # MLX 0.32's CUDA 8-bit quantized_matmul fails ("No implementation for problem shape") or
    # stalls when the key count is not a multiple of 64 (seen on an H200; bench/NOTES.md).
    key_align = 64

    def __init__(self, bits: int, group_size: int) -> None:
        self.bits, self.group_size = bits, group_size

    def encode_keys(self, keys: mx.array) -> Parts:
        return tuple(mx.quantize(keys, group_size=self.group_size, bits=self.bits))

    def encode_values(self, values: mx.array) -> Parts:
        return self.encode_keys(values)

    def attention(
        self, queries: mx.array, keys: Parts, values: Parts, scale: float, mask: Mask
    ) -> mx.array:
        shape = queries.shape
        q, mask, grouped = group_queries(queries * scale, mask, keys[0].shape[1], keys[0].shape[2])
        if grouped:
            keys = tuple(mx.expand_dims(x, -3) for x in keys)
            values = tuple(mx.expand_dims(x, -3) for x in values)
        qmm = {"group_size": self.group_size, "bits": self.bits}
        scores = masked(mx.quantized_matmul(q, *keys, transpose=True, **qmm), mask)
        weights = mx.softmax(scores, axis=-1, precise=True)
        out = mx.quantized_matmul(weights, *values, transpose=False, **qmm)
        return out.reshape(shape)
