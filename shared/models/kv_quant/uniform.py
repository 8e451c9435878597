"""Uniform (affine) KV quantization: MLX's `mx.quantize` per `group_size` values, attention
read through `mx.quantized_matmul` (mlx-lm `quantized_scaled_dot_product_attention`): the
packed keys and values are never expanded to full precision (except on CUDA, see below)."""

from __future__ import annotations

import mlx.core as mx

from .codec import Mask, Parts, fold_queries, masked


class UniformCodec:
    def __init__(self, bits: int, group_size: int, packed: bool | None = None) -> None:
        self.bits, self.group_size = bits, group_size
        # MLX 0.32's CUDA quantized_matmul has no kernel for many attention shapes (8-bit keys
        # at 16k tokens: "No implementation for problem shape: 7x16448x128x4", seen on an
        # H200), so there each layer's keys and values are expanded for the attention call;
        # the cache still holds them packed. Elsewhere attention reads them packed.
        self.packed = not mx.cuda.is_available() if packed is None else packed

    def encode_keys(self, keys: mx.array) -> Parts:
        return tuple(mx.quantize(keys, group_size=self.group_size, bits=self.bits))

    def encode_values(self, values: mx.array) -> Parts:
        return self.encode_keys(values)

    def attention(
        self, queries: mx.array, keys: Parts, values: Parts, scale: float, mask: Mask
    ) -> mx.array:
        if not self.packed:
            k, v = (
                mx.dequantize(*p, group_size=self.group_size, bits=self.bits)
                for p in (keys, values)
            )
            return mx.fast.scaled_dot_product_attention(queries, k, v, scale=scale, mask=mask)
        shape = queries.shape
        q, mask = fold_queries(queries * scale, mask, keys[0].shape[1], keys[0].shape[2])
        qmm = {"group_size": self.group_size, "bits": self.bits}
        scores = masked(mx.quantized_matmul(q, *keys, transpose=True, **qmm), mask)
        weights = mx.softmax(scores, axis=-1, precise=True)
        out = mx.quantized_matmul(weights, *values, transpose=False, **qmm)
        return out.reshape(shape)
