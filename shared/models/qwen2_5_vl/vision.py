"""Qwen2.5-VL vision tower (RMSNorm, SwiGLU, windowed attention with a few full blocks) in MLX."""

from __future__ import annotations

from functools import partial
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from shared.models.qwen2_5_vl.config import VisionArgs
from shared.models.vision_layers import (
    Grid,
    PackedVisionTower,
    PatchEmbed,
    PatchMerger,
    VisionBlock,
    activation,
    frame_cu_seqlens,
    rotary_cos_sin,
    vision_position_ids,
)

_NORM_EPS = 1e-6  # hard-coded in transformers, not read from the config
_PAD = -100


def window_index(grid: Grid, merge_size: int, window_size: int, patch_size: int):
    """Order of merged tokens grouped by window, and window boundaries in patches.

    Mirrors transformers' `get_vision_window_index`: each frame's merged-token grid is padded
    up to whole windows (a full extra window when already divisible; it ends up empty), windows
    are read row-major, padding dropped, empty windows removed from the boundaries.
    Returns (index over merged tokens (M,), cu_window_seqlens as a list of patch offsets).
    """
    win = window_size // merge_size // patch_size
    unit = merge_size * merge_size
    indices, cu, offset = [], [0], 0
    for t, h, w in grid:
        gh, gw = h // merge_size, w // merge_size
        index = np.arange(t * gh * gw).reshape(t, gh, gw)
        pad_h, pad_w = win - gh % win, win - gw % win
        nh, nw = (gh + pad_h) // win, (gw + pad_w) // win
        padded = np.pad(index, ((0, 0), (0, pad_h), (0, pad_w)), constant_values=_PAD)
        padded = padded.reshape(t, nh, win, nw, win).transpose(0, 1, 3, 2, 4)
        padded = padded.reshape(t, nh * nw, win * win)
        seqlens = (padded != _PAD).sum(-1).reshape(-1)
        flat = padded.reshape(-1)
        indices.append(flat[flat != _PAD] + offset)
        cu.extend((np.cumsum(seqlens) * unit + cu[-1]).tolist())
        offset += t * gh * gw
    cu = [b for i, b in enumerate(cu) if i == 0 or b != cu[i - 1]]  # unique_consecutive
    return np.concatenate(indices), cu


def permute_groups(x: Any, index: Any, unit: int) -> Any:
    """Reorder rows of x in groups of `unit` consecutive rows (one merged token each)."""
    shape = x.shape
    return x.reshape(shape[0] // unit, unit, *shape[1:])[index].reshape(shape)


class VisionMlp(nn.Module):
    """Gated MLP with biases (unlike the language model's)."""

    def __init__(self, dim: int, hidden_dim: int, hidden_act: str):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim)
        self.up_proj = nn.Linear(dim, hidden_dim)
        self.down_proj = nn.Linear(hidden_dim, dim)
        self._act = activation(hidden_act)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(self._act(self.gate_proj(x)) * self.up_proj(x))


def make_block(args: VisionArgs) -> VisionBlock:
    return VisionBlock(
        args.hidden_size,
        args.num_heads,
        partial(nn.RMSNorm, eps=_NORM_EPS),
        VisionMlp(args.hidden_size, args.intermediate_size, args.hidden_act),
    )


class VisionModel(PackedVisionTower):
    """Implements `VisionTower`: (N, C*T*P*P) patches + grid_thw -> (N / merge^2, out_hidden)."""

    def __init__(self, args: VisionArgs):
        super().__init__()
        self.args = args
        self.patch_embed = PatchEmbed(
            args.patch_size, args.temporal_patch_size, args.in_channels, args.hidden_size
        )
        self.blocks = [make_block(args) for _ in range(args.depth)]
        self.merger = PatchMerger(
            args.out_hidden_size,
            args.hidden_size,
            args.spatial_merge_size,
            nn.RMSNorm(args.hidden_size, eps=_NORM_EPS),
        )

    def __call__(self, pixel_values: mx.array, grid_thw: Any) -> mx.array:
        a = self.args
        grid = self.grid(pixel_values, grid_thw)
        unit = a.spatial_merge_size**2
        order, cu_windows = window_index(grid, a.spatial_merge_size, a.window_size, a.patch_size)
        # Windows only reorder tokens within a frame, so per-frame bounds stay valid after it.
        cu_frames = frame_cu_seqlens(grid)
        positions = permute_groups(vision_position_ids(grid, a.spatial_merge_size), order, unit)
        cos, sin = rotary_cos_sin(positions, a.hidden_size // a.num_heads, a.rope_theta)

        x = permute_groups(self.patch_embed(pixel_values), mx.array(order.astype(np.int32)), unit)
        full = set(a.fullatt_block_indexes)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, cu_frames if i in full else cu_windows)
        restore = mx.array(np.argsort(order).astype(np.int32))
        return self.merger(x)[restore]
