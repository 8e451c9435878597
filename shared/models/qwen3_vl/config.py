"""Qwen3-VL vision and text arguments, from config.json (`vision_config`, flattened text)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from shared.models import transformer
from shared.models.base import BaseModelArgs
from shared.models.qwen2_vl.config import normalize_vision_params
from shared.models.rope import default_inv_freq, rope_config

# transformers' Qwen3-VL default when rope_parameters carry no mrope_section (head_dim 128).
DEFAULT_MROPE_SECTION = (24, 20, 20)


@dataclass
class VisionArgs(BaseModelArgs):
    """`vision_config`: `hidden_size` is the ViT width, `out_hidden_size` the LM width.

    The learned position table has `num_position_embeddings` entries (a square grid), resampled
    bilinearly to each image's patch grid. After each block in `deepstack_visual_indexes`, the
    hidden states also go through their own merger: DeepStack level i.
    """

    depth: int = 27
    hidden_size: int = 1152
    hidden_act: str = "gelu_pytorch_tanh"
    intermediate_size: int = 4304
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 16
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    out_hidden_size: int = 3584
    num_position_embeddings: int = 2304
    deepstack_visual_indexes: list[int] = field(default_factory=lambda: [8, 16, 24])
    rope_theta: float = 10000.0

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> VisionArgs:
        args = super().from_dict(normalize_vision_params(params))
        args.deepstack_visual_indexes = [int(i) for i in args.deepstack_visual_indexes]
        return args

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid_side(self) -> int:
        return int(self.num_position_embeddings**0.5)


@dataclass
class TextArgs(transformer.TransformerArgs):
    """The flat text config: Qwen3 (q/k RMSNorm, explicit head_dim, no bias) with M-RoPE."""

    model_type: str = "qwen3_vl"
    qk_norm: bool = True
    rope_theta: float | None = 500000.0  # transformers' default_theta for Qwen3-VL text

    def mrope(self) -> tuple[float, tuple[int, ...]]:
        """(theta, mrope_section) from either config style."""
        theta, params = rope_config(self.rope_theta, self.rope_scaling, self.rope_parameters)
        if params["rope_type"] not in ("default", "mrope"):
            raise NotImplementedError(f"Qwen3-VL with rope_type {params['rope_type']!r}")
        section = params.get("mrope_section") or DEFAULT_MROPE_SECTION
        return theta, tuple(int(s) for s in section)

    def inv_freq(self) -> mx.array:
        return default_inv_freq(self.head_dim, self.mrope()[0])
