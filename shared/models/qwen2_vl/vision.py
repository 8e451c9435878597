"""Qwen2-VL vision tower (ViT with 2-D rotary, per-frame attention, 2x2 patch merger) in MLX."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from shared.models.qwen2_vl.config import VisionArgs
from shared.models.vision_layers import (
    PatchEmbed,
    PatchMerger,
    VisionAttention,
    activation,
    as_grid_list,
    check_patch_count,
    frame_cu_seqlens,
    rotary_cos_sin,
    sanitize_vision_weights,
    vision_position_ids,
)

_NORM_EPS = 1e-6  # hard-coded in transformers, not read from the config


class VisionMlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, hidden_act: str):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self._act = activation(hidden_act)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(self._act(self.fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.norm1 = nn.LayerNorm(args.embed_dim, eps=_NORM_EPS)
        self.norm2 = nn.LayerNorm(args.embed_dim, eps=_NORM_EPS)
        self.attn = VisionAttention(args.embed_dim, args.num_heads)
        self.mlp = VisionMlp(args.embed_dim, args.mlp_hidden_dim, args.hidden_act)

    def __call__(
        self, x: mx.array, cos: mx.array, sin: mx.array, cu_seqlens: Sequence[int]
    ) -> mx.array:
        x = x + self.attn(self.norm1(x), cos, sin, cu_seqlens)
        return x + self.mlp(self.norm2(x))


class VisionModel(nn.Module):
    """Implements `VisionTower`: (N, C*T*P*P) patches + grid_thw -> (N / merge^2, hidden_size)."""

    def __init__(self, args: VisionArgs):
        super().__init__()
        self.args = args
        self.patch_embed = PatchEmbed(
            args.patch_size, args.temporal_patch_size, args.in_channels, args.embed_dim
        )
        self.blocks = [VisionBlock(args) for _ in range(args.depth)]
        self.merger = PatchMerger(
            args.hidden_size,
            args.embed_dim,
            args.spatial_merge_size,
            nn.LayerNorm(args.embed_dim, eps=_NORM_EPS),
        )

    def __call__(self, pixel_values: mx.array, grid_thw: Any) -> mx.array:
        grid = as_grid_list(grid_thw)
        check_patch_count(pixel_values, grid)
        head_dim = self.args.embed_dim // self.args.num_heads
        positions = vision_position_ids(grid, self.args.spatial_merge_size)
        cos, sin = rotary_cos_sin(positions, head_dim, self.args.rope_theta)
        # Every block attends within one frame: an image is one frame, a video t of them.
        cu_seqlens = frame_cu_seqlens(grid)

        x = self.patch_embed(pixel_values)
        for block in self.blocks:
            x = block(x, cos, sin, cu_seqlens)
        return self.merger(x)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        a = self.args
        return sanitize_vision_weights(weights, a.in_channels, a.temporal_patch_size, a.patch_size)
