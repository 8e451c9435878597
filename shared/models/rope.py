"""Rotary position embeddings: default, linear and llama3 scaling, and Qwen2-VL's M-RoPE.

Every rope here is the "rotate half" (non-traditional) layout that transformers uses. A rope
module turns positions into a `RotaryPositions` once per forward pass; each attention layer
then calls `rope.apply(x, positions)` on its queries and keys. Two ways to rotate:

* fast path: positions are `offset + arange(L)` (an int or a (B,) array offset), so
  `mx.fast.rope` does it in one kernel. This is every text-only step and every decode step;
* general path: arbitrary positions (explicit `position_ids`, M-RoPE with differing rows),
  where cos/sin tables are built once per forward and shared by all layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

DEFAULT_ROPE_THETA = 10000.0
DEFAULT_MROPE_SECTION = [16, 24, 24]  # transformers' default for Qwen2-VL


def rope_config(
    rope_theta: float | None,
    rope_scaling: dict[str, Any] | None,
    rope_parameters: dict[str, Any] | None,
) -> tuple[float, dict[str, Any]]:
    """Normalise transformers-4 (`rope_theta` + `rope_scaling`) and transformers-5
    (`rope_parameters`) config styles to `(theta, params)`, where `params["rope_type"]` is set."""
    params: dict[str, Any] = dict(rope_scaling or {})
    params.update(rope_parameters or {})
    theta = params.get("rope_theta")
    if theta is None:
        theta = rope_theta if rope_theta is not None else DEFAULT_ROPE_THETA
    rope_type = params.get("rope_type") or params.get("type") or "default"
    params["rope_type"] = rope_type
    return float(theta), params


def default_inv_freq(dims: int, base: float) -> mx.array:
    """inv_freq[i] = base ** (-2i / dims), computed in fp32 exactly as transformers does."""
    exponent = mx.arange(0, dims, 2, dtype=mx.float32) / dims
    return 1.0 / (base**exponent)


def llama3_inv_freq(dims: int, base: float, params: dict[str, Any]) -> mx.array:
    """Llama 3.1 frequency scaling: long wavelengths divided by `factor`, short ones kept,
    a smooth interpolation in between (transformers' `_compute_llama3_parameters`)."""
    factor = float(params["factor"])
    low = float(params.get("low_freq_factor", 1.0))
    high = float(params.get("high_freq_factor", 4.0))
    old_ctx = float(params["original_max_position_embeddings"])
    inv_freq = default_inv_freq(dims, base)
    wavelen = 2 * math.pi / inv_freq
    scaled = mx.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    return mx.where(medium, smoothed, scaled)


@dataclass
class RotaryPositions:
    """Where the tokens of one forward pass sit. Exactly one form is used:
    `offset` (fast path) when `cos`/`sin` are None, else the (B, 1, L, D) tables."""

    offset: int | mx.array = 0
    cos: mx.array | None = None
    sin: mx.array | None = None


def rotate_half(x: mx.array) -> mx.array:
    half = x.shape[-1] // 2
    return mx.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def cos_sin(angles: mx.array) -> tuple[mx.array, mx.array]:
    """(B, L, D/2) angles -> (B, 1, L, D) cos and sin in transformers' duplicated-halves layout."""
    emb = mx.concatenate([angles, angles], axis=-1)[:, None]
    return mx.cos(emb), mx.sin(emb)


class RoPE(nn.Module):
    """1-D rotary embedding over the first `dims` features, from a per-band inverse frequency.

    `__call__(x, offset)` keeps mlx-lm's signature for callers that only need the fast path.
    """

    def __init__(self, dims: int, inv_freq: mx.array, scale: float = 1.0) -> None:
        super().__init__()
        self.dims = dims
        self.scale = scale
        # Private (underscore) so it is not a parameter and never expected in checkpoints.
        self._inv_freq = inv_freq.astype(mx.float32)
        # mx.fast.rope takes periods (1 / inv_freq), not frequencies.
        self._freqs = 1.0 / self._inv_freq

    @property
    def inv_freq(self) -> mx.array:
        return self._inv_freq

    def __call__(self, x: mx.array, offset: int | mx.array = 0) -> mx.array:
        return mx.fast.rope(
            x,
            self.dims,
            traditional=False,
            base=None,
            scale=self.scale,
            offset=offset,
            freqs=self._freqs,
        )

    def positions(
        self, length: int, offset: int, position_ids: mx.array | None = None
    ) -> RotaryPositions:
        """`position_ids` is (B, L); None means `offset + arange(length)`."""
        if position_ids is None:
            return RotaryPositions(offset=offset)
        if position_ids.ndim == 3:  # (3, B, L) from an M-RoPE caller: rows are equal for 1-D
            position_ids = position_ids[0]
        if length == 1:  # one token per row: a per-row offset is exact
            return RotaryPositions(offset=position_ids[:, 0].astype(mx.int32))
        angles = position_ids[..., None].astype(mx.float32) * self.scale * self._inv_freq
        cos, sin = cos_sin(angles)
        return RotaryPositions(cos=cos, sin=sin)

    def apply(self, x: mx.array, pos: RotaryPositions) -> mx.array:
        """Rotate (B, H, L, D) queries or keys to the given positions."""
        if pos.cos is None:
            return self(x, pos.offset)
        # Tables are fp32; cast to the activations' dtype as transformers does (bf16 stays bf16).
        return x * pos.cos.astype(x.dtype) + rotate_half(x) * pos.sin.astype(x.dtype)


class MRoPE(RoPE):
    """Qwen2-VL multimodal rotary embedding.

    `position_ids` is (3, B, L): temporal, height and width positions. The D/2 frequency bands
    are split into `mrope_section` consecutive groups; group i takes its angle from row i % 3
    (transformers' `Qwen2VLRotaryEmbedding.recomposition_frequencies`). When the three rows are
    equal this is plain 1-D RoPE, so (B, L) positions or None take the 1-D (fast) paths.
    """

    def __init__(self, dims: int, inv_freq: mx.array, mrope_section: list[int]) -> None:
        super().__init__(dims, inv_freq)
        if sum(mrope_section) != dims // 2:
            raise ValueError(f"mrope_section {mrope_section} must sum to head_dim/2 = {dims // 2}")
        self.mrope_section = tuple(mrope_section)

    def positions(
        self, length: int, offset: int, position_ids: mx.array | None = None
    ) -> RotaryPositions:
        if position_ids is None or position_ids.ndim == 2:
            return super().positions(length, offset, position_ids)
        angles = position_ids[..., None].astype(mx.float32) * self._inv_freq  # (3, B, L, D/2)
        parts, start = [], 0
        for i, size in enumerate(self.mrope_section):
            parts.append(angles[i % 3, ..., start : start + size])
            start += size
        cos, sin = cos_sin(mx.concatenate(parts, axis=-1))
        return RotaryPositions(cos=cos, sin=sin)


def initialize_rope(
    dims: int,
    rope_theta: float | None = None,
    rope_scaling: dict[str, Any] | None = None,
    rope_parameters: dict[str, Any] | None = None,
) -> RoPE:
    """Build the 1-D rope a text config asks for (either transformers config style)."""
    theta, params = rope_config(rope_theta, rope_scaling, rope_parameters)
    rope_type = params["rope_type"]
    if rope_type in ("default", "mrope"):
        return RoPE(dims, default_inv_freq(dims, theta))
    if rope_type == "linear":
        return RoPE(dims, default_inv_freq(dims, theta), scale=1.0 / float(params["factor"]))
    if rope_type == "llama3":
        return RoPE(dims, llama3_inv_freq(dims, theta, params))
    raise NotImplementedError(f"rope_type {rope_type!r} is not supported")


def initialize_mrope(
    dims: int,
    rope_theta: float | None = None,
    rope_scaling: dict[str, Any] | None = None,
    rope_parameters: dict[str, Any] | None = None,
) -> MRoPE:
    """Build Qwen2-VL's M-RoPE; transformers treats rope_type "mrope" as default frequencies."""
    theta, params = rope_config(rope_theta, rope_scaling, rope_parameters)
    if params["rope_type"] not in ("default", "mrope"):
        raise NotImplementedError(f"M-RoPE with rope_type {params['rope_type']!r}")
    section = params.get("mrope_section") or DEFAULT_MROPE_SECTION
    return MRoPE(dims, default_inv_freq(dims, theta), section)
