"""Pieces shared by the Qwen2-VL, Qwen2.5-VL and Qwen3-VL vision towers (MLX).

Layout conventions follow transformers' `modeling_qwen2_vl.py` / `modeling_qwen2_5_vl.py`:
patches arrive flattened as (N, C*T*P*P) in spatial-merge-block order, attention is packed
(one sequence of all patches) and segmented by `cu_seqlens` so it never crosses an image,
a video frame or (Qwen2.5-VL) a window.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

Grid = list[tuple[int, int, int]]


def as_grid_list(grid_thw: Any) -> Grid:
    """(n_items, 3) grid from an mx.array, numpy array or nested sequence, as Python ints."""
    grid = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    return [(int(t), int(h), int(w)) for t, h, w in grid.tolist()]


def quick_gelu(x: mx.array) -> mx.array:
    """transformers' QuickGELUActivation: x * sigmoid(1.702 x)."""
    return x * mx.sigmoid(1.702 * x)


_ACTIVATIONS: dict[str, Callable[[mx.array], mx.array]] = {
    "quick_gelu": quick_gelu,
    "gelu": nn.gelu,  # exact (erf), as torch.nn.GELU()
    "gelu_pytorch_tanh": nn.gelu_approx,
    "silu": nn.silu,
}


def activation(name: str) -> Callable[[mx.array], mx.array]:
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported vision activation {name!r}") from None


# ----------------------------------------------------------------------------- patch embedding


class PatchEmbed(nn.Module):
    """Conv3d with stride == kernel over pre-cut patches, done as one matmul.

    `proj.weight` keeps MLX's Conv3d layout (embed, T, P, P, C) so checkpoints in the
    mlx-community layout load unchanged; each patch then only needs C moved last and a flatten.
    """

    def __init__(self, patch_size: int, temporal_patch_size: int, in_channels: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.temporal_patch_size = temporal_patch_size
        self.in_channels = in_channels
        self.embed_dim = embed_dim
        kernel = (temporal_patch_size, patch_size, patch_size)
        self.proj = nn.Conv3d(in_channels, embed_dim, kernel, stride=kernel, bias=False)

    def __call__(self, pixel_values: mx.array) -> mx.array:
        c, t, p = self.in_channels, self.temporal_patch_size, self.patch_size
        w = self.proj.weight
        x = pixel_values.astype(w.dtype).reshape(-1, c, t, p, p)
        x = x.transpose(0, 2, 3, 4, 1).reshape(x.shape[0], -1)
        return x @ w.reshape(self.embed_dim, -1).T


def patch_embed_to_channels_last(
    weight: mx.array, in_channels: int, temporal_patch_size: int, patch_size: int
) -> mx.array:
    """PyTorch Conv3d weight (E, C, T, P, P) -> MLX (E, T, P, P, C); already-MLX weights pass.

    Decided by the full expected shape so that calling it twice is a no-op.
    """
    c, t, p = in_channels, temporal_patch_size, patch_size
    if weight.ndim == 5 and tuple(weight.shape[1:]) == (t, p, p, c):
        return weight
    if weight.ndim == 5 and tuple(weight.shape[1:]) == (c, t, p, p):
        return weight.transpose(0, 2, 3, 4, 1)
    raise ValueError(
        f"patch_embed.proj.weight has shape {tuple(weight.shape)}; expected (E, {t}, {p}, {p}, {c})"
        f" or PyTorch (E, {c}, {t}, {p}, {p})"
    )


def sanitize_vision_weights(
    weights: dict[str, mx.array], in_channels: int, temporal_patch_size: int, patch_size: int
) -> dict[str, mx.array]:
    """Drop non-persistent buffers and convert the patch embedding; keys may carry any prefix."""
    out: dict[str, mx.array] = {}
    for key, value in weights.items():
        if "rotary_pos_emb." in key or key.endswith("position_ids"):
            continue  # recomputed from the config; some exports still carry inv_freq
        if key.endswith("patch_embed.proj.weight"):
            value = patch_embed_to_channels_last(
                value, in_channels, temporal_patch_size, patch_size
            )
        out[key] = value
    return out


# ----------------------------------------------------------------------------- 2-D rotary


def vision_position_ids(grid: Grid, merge_size: int) -> np.ndarray:
    """(N, 2) (row, col) patch coordinates in spatial-merge-block order, repeated per frame."""
    parts = []
    for t, h, w in grid:
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        block = (h // merge_size, merge_size, w // merge_size, merge_size)
        rows = rows.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
        cols = cols.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
        parts.append(np.tile(np.stack([rows, cols], axis=-1), (t, 1)))
    return np.concatenate(parts, axis=0)


def rotary_cos_sin(
    position_ids: np.ndarray, head_dim: int, theta: float
) -> tuple[mx.array, mx.array]:
    """Axial rotary tables (N, head_dim): [h freqs, w freqs] twice, as transformers lays them out.

    Each axis gets head_dim // 4 frequencies computed over a spatial dim of head_dim // 2.
    """
    spatial_dim = head_dim // 2
    inv_freq = 1.0 / (theta ** (mx.arange(0, spatial_dim, 2, dtype=mx.float32) / spatial_dim))
    pos = mx.array(position_ids.astype(np.float32))  # (N, 2)
    angles = (pos[:, :, None] * inv_freq).reshape(pos.shape[0], -1)  # (N, head_dim // 2)
    angles = mx.concatenate([angles, angles], axis=-1)
    return mx.cos(angles), mx.sin(angles)


def rotate_half(x: mx.array) -> mx.array:
    half = x.shape[-1] // 2
    return mx.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """x: (N, heads, head_dim); cos/sin: (N, head_dim). Done in fp32 like transformers."""
    xf = x.astype(mx.float32)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return (xf * cos + rotate_half(xf) * sin).astype(x.dtype)


# ----------------------------------------------------------------------------- segmented attention


def frame_cu_seqlens(grid: Grid) -> list[int]:
    """Segment boundaries with one segment per frame (t*h*w patches -> t segments of h*w)."""
    lengths = [h * w for t, h, w in grid for _ in range(t)]
    return np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).tolist()


def segment_attention(
    q: mx.array, k: mx.array, v: mx.array, cu_seqlens: Sequence[int], scale: float
) -> mx.array:
    """Non-causal attention within each [cu[i], cu[i+1]) segment; q/k/v (N, H, D) -> (N, H*D).

    Why not a block-diagonal mask: it costs O(N^2) memory and compute for what is usually
    many small segments (Qwen2.5-VL windows of 64 patches, video frames). Why not one SDPA call
    per segment: a large image has hundreds of windows per layer. Instead segments are grouped
    by length and each group runs as one batched SDPA call — typically one or a few calls per
    layer, with exactly sum(L_i^2) work. Empty segments are skipped.
    """
    n, heads, dim = q.shape
    bounds = np.asarray(cu_seqlens, dtype=np.int64)
    starts, lengths = bounds[:-1], np.diff(bounds)
    if bounds[0] != 0 or bounds[-1] != n or (lengths < 0).any():
        raise ValueError(f"cu_seqlens {list(cu_seqlens)} do not tile {n} patches")
    keep = lengths > 0
    starts, lengths = starts[keep], lengths[keep]

    def run(qs: mx.array, ks: mx.array, vs: mx.array, count: int, length: int) -> mx.array:
        def to_bhld(x: mx.array) -> mx.array:
            return x.reshape(count, length, heads, dim).transpose(0, 2, 1, 3)

        out = mx.fast.scaled_dot_product_attention(
            to_bhld(qs), to_bhld(ks), to_bhld(vs), scale=scale
        )
        return out.transpose(0, 2, 1, 3).reshape(count * length, heads * dim)

    unique = np.unique(lengths)
    if len(unique) == 1:  # segments are contiguous and equal: a plain reshape batches them
        return run(q, k, v, len(lengths), int(unique[0]))

    outputs, order = [], []
    for length in unique.tolist():
        group_starts = starts[lengths == length]
        rows = (group_starts[:, None] + np.arange(length)).reshape(-1)
        idx = mx.array(rows.astype(np.int32))
        outputs.append(run(q[idx], k[idx], v[idx], len(group_starts), length))
        order.append(rows)
    inverse = np.argsort(np.concatenate(order)).astype(np.int32)
    return mx.concatenate(outputs, axis=0)[mx.array(inverse)]


class VisionAttention(nn.Module):
    """Fused qkv projection, 2-D rotary on q and k, segmented attention, output projection."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def __call__(
        self, x: mx.array, cos: mx.array, sin: mx.array, cu_seqlens: Sequence[int]
    ) -> mx.array:
        n = x.shape[0]
        qkv = self.qkv(x).reshape(n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        return self.proj(segment_attention(q, k, v, cu_seqlens, self.scale))


class VisionMlp(nn.Module):
    """Linear-activation-Linear, named `fc1` / `fc2` as in the Qwen2-VL and SigLIP checkpoints."""

    def __init__(self, dim: int, hidden_dim: int, hidden_act: str):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self._act = activation(hidden_act)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(self._act(self.fc1(x)))


class VisionBlock(nn.Module):
    """Pre-norm ViT block over packed patches: x + attn(norm1(x)), then x + mlp(norm2(x)).

    The Qwen towers differ only in the norm (LayerNorm / RMSNorm, built by `norm(dim)`) and the
    MLP (parameter names, gating), so both come from the caller.
    """

    def __init__(self, dim: int, num_heads: int, norm: Callable[[int], nn.Module], mlp: nn.Module):
        super().__init__()
        self.norm1 = norm(dim)
        self.norm2 = norm(dim)
        self.attn = VisionAttention(dim, num_heads)
        self.mlp = mlp

    def __call__(
        self, x: mx.array, cos: mx.array, sin: mx.array, cu_seqlens: Sequence[int]
    ) -> mx.array:
        x = x + self.attn(self.norm1(x), cos, sin, cu_seqlens)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """Norm each patch, concatenate each merge x merge block, then Linear-GELU-Linear.

    `mlp` is a list so parameters are named `mlp.0` / `mlp.2` as in the checkpoints.
    """

    def __init__(self, out_dim: int, context_dim: int, merge_size: int, norm: nn.Module):
        super().__init__()
        self.hidden_size = context_dim * merge_size**2
        self.ln_q = norm
        self.mlp = [
            nn.Linear(self.hidden_size, self.hidden_size),
            nn.GELU(),
            nn.Linear(self.hidden_size, out_dim),
        ]

    def __call__(self, x: mx.array) -> mx.array:
        x = self.ln_q(x).reshape(-1, self.hidden_size)
        for layer in self.mlp:
            x = layer(x)
        return x


class PackedVisionTower(nn.Module):
    """What the Qwen towers share around their blocks: reading and checking `grid_thw`, the
    per-frame rotary tables and segments, and checkpoint clean-up. `args` needs in_channels,
    patch_size, temporal_patch_size, spatial_merge_size and rope_theta."""

    args: Any

    def grid(self, pixel_values: mx.array, grid_thw: Any) -> Grid:
        grid = as_grid_list(grid_thw)
        check_patch_count(pixel_values, grid)
        return grid

    def frame_rotary(self, grid: Grid, head_dim: int) -> tuple[mx.array, mx.array, list[int]]:
        """cos, sin for the patches in merge-block order, and one attention segment per frame
        (an image is one frame, a video t of them)."""
        a = self.args
        positions = vision_position_ids(grid, a.spatial_merge_size)
        cos, sin = rotary_cos_sin(positions, head_dim, a.rope_theta)
        return cos, sin, frame_cu_seqlens(grid)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        a = self.args
        return sanitize_vision_weights(weights, a.in_channels, a.temporal_patch_size, a.patch_size)


def check_patch_count(pixel_values: mx.array, grid: Grid) -> None:
    expected = sum(t * h * w for t, h, w in grid)
    if pixel_values.shape[0] != expected:
        raise ValueError(
            f"pixel_values has {pixel_values.shape[0]} patches but grid_thw {grid} needs {expected}"
        )
