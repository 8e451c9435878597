"""Qwen2.5-VL vision tower arguments (the text side reuses Qwen2-VL's)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shared.models.base import BaseModelArgs
from shared.models.qwen2_vl.config import normalize_vision_params


@dataclass
class VisionArgs(BaseModelArgs):
    """Qwen2.5-VL `vision_config`: `hidden_size` is the tower width, `out_hidden_size` its output.

    `window_size` is in pixels; windows are window_size // patch_size // merge_size merged tokens
    on a side. Blocks listed in `fullatt_block_indexes` attend over whole frames, the rest
    within windows.
    """

    depth: int = 32
    hidden_size: int = 1280
    out_hidden_size: int = 3584
    intermediate_size: int = 3420
    hidden_act: str = "silu"
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: list[int] = field(default_factory=lambda: [7, 15, 23, 31])
    tokens_per_second: float = 4  # transformers' default; published configs say 2
    rope_theta: float = 10000.0

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> VisionArgs:
        params = normalize_vision_params(params)
        if "out_hidden_size" not in params and "embed_dim" in params:
            # Written with Qwen2-VL names: width in embed_dim, output in hidden_size.
            params["out_hidden_size"] = params.get("hidden_size", cls.out_hidden_size)
            params["hidden_size"] = params["embed_dim"]
        args = super().from_dict(params)
        args.fullatt_block_indexes = [int(i) for i in args.fullatt_block_indexes]
        return args

    @property
    def embed_dim(self) -> int:
        """Tower width (same name as Qwen2-VL's field)."""
        return self.hidden_size
