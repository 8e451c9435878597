"""Quantized layers that hand MLX one matrix of rows, and the swap that installs them.

MLX 0.32's CUDA quantized matmul runs an input with batch dimensions one batch element at a
time, so a decode step's (rows, 1, hidden) activations read the weights once per row. On an
H200, a 4-bit 18944 x 3584 projection over 32 rows took 1052 us as (32, 1, 3584) and 164 us
as (32, 3584); bf16 matmuls do not care (`bench/NOTES.md`, issue #10). Folding the leading
dimensions into rows gives one kernel and the same numbers row by row, on every backend.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map_with_path

from shared.loading.config import Quantization


def _as_rows(call: Callable[[mx.array], mx.array], x: mx.array) -> mx.array:
    if x.ndim <= 2:
        return call(x)
    return call(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)


class QuantizedLinear(nn.QuantizedLinear):
    def __call__(self, x: mx.array) -> mx.array:
        return _as_rows(super().__call__, x)


class QuantizedEmbedding(nn.QuantizedEmbedding):
    def as_linear(self, x: mx.array) -> mx.array:
        return _as_rows(super().as_linear, x)


def quantize(
    module: nn.Module, quant: Quantization, predicate: Callable[[str, nn.Module], bool]
) -> None:
    """`nn.quantize` with the row-folding layers: the leaves `predicate` picks become quantized
    (weights are loaded afterwards; only the shapes matter here)."""
    args = (quant.group_size, quant.bits, quant.mode)

    def swap(path: str, leaf: nn.Module) -> nn.Module:
        if not predicate(path, leaf):
            return leaf
        if isinstance(leaf, nn.Linear):
            return QuantizedLinear.from_linear(leaf, *args)
        if isinstance(leaf, nn.Embedding):
            return QuantizedEmbedding.from_embedding(leaf, *args)
        raise ValueError(f"cannot quantize {path}: a {type(leaf).__name__}")

    leaves = tree_map_with_path(swap, module.leaf_modules(), is_leaf=nn.Module.is_module)
    module.update_modules(leaves)
