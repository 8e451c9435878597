"""Qwen3-VL vision tower in MLX: biased patch embedding plus interpolated learned positions,
2-D rotary ViT blocks, a 2x2 patch merger, and DeepStack mergers on intermediate blocks.

Output: `MediaFeatures` whose `features` are the final merger's rows and whose extras
"deepstack.{i}" are the rows of the i-th DeepStack merger (same row count, LM width).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from shared.models.base import MediaFeatures
from shared.models.qwen3_vl.config import VisionArgs
from shared.models.vision_layers import (
    Grid,
    PackedVisionTower,
    PatchEmbed,
    VisionBlock,
    activation,
    vision_position_ids,
)

_NORM_EPS = 1e-6  # hard-coded in transformers, not read from the config
DEEPSTACK_PREFIX = "deepstack."


def interpolation_taps(grid: Grid, merge: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, 4) indices into the side x side position table and their bilinear weights, per patch
    in spatial-merge-block order, repeated per frame (transformers'
    `get_vision_interpolation_indices_and_weights`, bilinear, align_corners=True)."""
    indices, weights = [], []
    for (t, h, w), rc in zip(grid, _row_cols(grid, merge), strict=True):
        h_taps, h_w = _axis_taps(rc[:, 0], h, side)
        w_taps, w_w = _axis_taps(rc[:, 1], w, side)
        idx = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
        wts = (h_w[:, :, None] * w_w[:, None, :]).reshape(-1, 4)
        indices.append(np.tile(idx, (t, 1)))
        weights.append(np.tile(wts, (t, 1)))
    return np.concatenate(indices), np.concatenate(weights)


def _row_cols(grid: Grid, merge: int) -> list[np.ndarray]:
    """Per item, (h*w, 2) patch coordinates of one frame in merge-block order."""
    out, start = [], 0
    positions = vision_position_ids(grid, merge)
    for t, h, w in grid:
        out.append(positions[start : start + h * w])
        start += t * h * w
    return out


def _axis_taps(index: np.ndarray, size: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    src = index.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
    floor = np.floor(src)
    offsets = np.arange(2)
    taps = np.clip(floor.astype(np.int64)[:, None] + offsets, 0, side - 1)
    weights = np.clip(1 - np.abs(src[:, None] - floor[:, None] - offsets), 0, None)
    return taps, weights.astype(np.float32)


class BiasedPatchEmbed(PatchEmbed):
    """The Conv3d patch embedding with a bias (Qwen2-VL's has none)."""

    def __init__(self, patch_size: int, temporal_patch_size: int, in_channels: int, embed_dim: int):
        super().__init__(patch_size, temporal_patch_size, in_channels, embed_dim)
        kernel = (temporal_patch_size, patch_size, patch_size)
        self.proj = nn.Conv3d(in_channels, embed_dim, kernel, stride=kernel, bias=True)

    def __call__(self, pixel_values: mx.array) -> mx.array:
        return super().__call__(pixel_values) + self.proj.bias


class VisionMlp(nn.Module):
    """Linear-activation-Linear; the shared `vision_layers.VisionMlp` with Qwen3-VL's names."""

    def __init__(self, dim: int, hidden_dim: int, hidden_act: str):
        super().__init__()
        self.linear_fc1 = nn.Linear(dim, hidden_dim)
        self.linear_fc2 = nn.Linear(hidden_dim, dim)
        self._act = activation(hidden_act)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear_fc2(self._act(self.linear_fc1(x)))


def make_block(args: VisionArgs) -> VisionBlock:
    return VisionBlock(
        args.hidden_size,
        args.num_heads,
        partial(nn.LayerNorm, eps=_NORM_EPS),
        VisionMlp(args.hidden_size, args.intermediate_size, args.hidden_act),
    )


class PatchMerger(nn.Module):
    """Concatenate each merge x merge block, Linear-GELU-Linear. The final merger normalises
    each patch before the concatenation, the DeepStack ones (`postshuffle`) after it."""

    def __init__(self, args: VisionArgs, postshuffle: bool):
        super().__init__()
        self.hidden_size = args.hidden_size * args.spatial_merge_size**2
        self.postshuffle = postshuffle
        self.norm = nn.LayerNorm(self.hidden_size if postshuffle else args.hidden_size, eps=1e-6)
        self.linear_fc1 = nn.Linear(self.hidden_size, self.hidden_size)
        self.linear_fc2 = nn.Linear(self.hidden_size, args.out_hidden_size)

    def __call__(self, x: mx.array) -> mx.array:
        if self.postshuffle:
            x = self.norm(x.reshape(-1, self.hidden_size))
        else:
            x = self.norm(x).reshape(-1, self.hidden_size)
        return self.linear_fc2(nn.gelu(self.linear_fc1(x)))


class VisionModel(PackedVisionTower):
    """Implements `VisionTower`: (N, C*T*P*P) patches + grid_thw -> `MediaFeatures` of
    N / merge^2 rows (main features and one extra per DeepStack level)."""

    def __init__(self, args: VisionArgs):
        super().__init__()
        self.args = args
        self.patch_embed = BiasedPatchEmbed(
            args.patch_size, args.temporal_patch_size, args.in_channels, args.hidden_size
        )
        self.pos_embed = nn.Embedding(args.num_position_embeddings, args.hidden_size)
        self.blocks = [make_block(args) for _ in range(args.depth)]
        self.merger = PatchMerger(args, postshuffle=False)
        self.deepstack_merger_list = [
            PatchMerger(args, postshuffle=True) for _ in args.deepstack_visual_indexes
        ]

    def _positions(self, grid: Grid) -> mx.array:
        """Learned position embeddings resampled to each item's grid: (N, hidden)."""
        idx, wts = interpolation_taps(grid, self.args.spatial_merge_size, self.args.grid_side)
        table = self.pos_embed(mx.array(idx.astype(np.int32)))  # (N, 4, hidden)
        return (table * mx.array(wts)[:, :, None].astype(table.dtype)).sum(axis=1)

    def __call__(self, pixel_values: mx.array, grid_thw: Any) -> MediaFeatures:
        a = self.args
        grid = self.grid(pixel_values, grid_thw)
        cos, sin, cu_seqlens = self.frame_rotary(grid, a.head_dim)  # attention within each frame

        x = self.patch_embed(pixel_values)
        x = x + self._positions(grid).astype(x.dtype)
        levels = {layer: i for i, layer in enumerate(a.deepstack_visual_indexes)}
        deepstack: dict[str, mx.array] = {}
        for layer, block in enumerate(self.blocks):
            x = block(x, cos, sin, cu_seqlens)
            if layer in levels:
                i = levels[layer]
                deepstack[f"{DEEPSTACK_PREFIX}{i}"] = self.deepstack_merger_list[i](x)
        return MediaFeatures(self.merger(x), deepstack)
