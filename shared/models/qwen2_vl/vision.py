"""Qwen2-VL vision tower (ViT with 2-D rotary, per-frame attention, 2x2 patch merger) in MLX."""

from __future__ import annotations

from functools import partial
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from shared.models.qwen2_vl.config import VisionArgs
from shared.models.vision_layers import (
    PackedVisionTower,
    PatchEmbed,
    PatchMerger,
    VisionBlock,
    VisionMlp,
)

_NORM_EPS = 1e-6  # hard-coded in transformers, not read from the config


def make_block(args: VisionArgs) -> VisionBlock:
    return VisionBlock(
        args.embed_dim,
        args.num_heads,
        partial(nn.LayerNorm, eps=_NORM_EPS),
        VisionMlp(args.embed_dim, args.mlp_hidden_dim, args.hidden_act),
    )


class VisionModel(PackedVisionTower):
    """Implements `VisionTower`: (N, C*T*P*P) patches + grid_thw -> (N / merge^2, hidden_size)."""

    def __init__(self, args: VisionArgs):
        super().__init__()
        self.args = args
        self.patch_embed = PatchEmbed(
            args.patch_size, args.temporal_patch_size, args.in_channels, args.embed_dim
        )
        self.blocks = [make_block(args) for _ in range(args.depth)]
        self.merger = PatchMerger(
            args.hidden_size,
            args.embed_dim,
            args.spatial_merge_size,
            nn.LayerNorm(args.embed_dim, eps=_NORM_EPS),
        )

    def __call__(self, pixel_values: mx.array, grid_thw: Any) -> mx.array:
        grid = self.grid(pixel_values, grid_thw)
        # Every block attends within one frame.
        cos, sin, cu_seqlens = self.frame_rotary(grid, self.args.embed_dim // self.args.num_heads)

        x = self.patch_embed(pixel_values)
        for block in self.blocks:
            x = block(x, cos, sin, cu_seqlens)
        return self.merger(x)
