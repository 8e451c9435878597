"""Gemma's RMSNorm: the weight is stored as an offset from 1 (`x * (1 + w)`), fp32 math."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


class GemmaRMSNorm(nn.Module):
    def __init__(self, dims: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = mx.zeros((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        # transformers normalises and scales in fp32 and casts once (not x.to(dtype) * w).
        scale = 1.0 + self.weight.astype(mx.float32)
        return mx.fast.rms_norm(x.astype(mx.float32), scale, self.eps).astype(x.dtype)
