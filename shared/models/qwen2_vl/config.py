"""Qwen2-VL vision tower arguments (text arguments live in `language.py`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shared.models.base import BaseModelArgs

# Alternative spellings seen in published (transformers-4), transformers-5 and mlx-community
# vision configs, mapped to the field names used here.
_ALIASES = {
    "in_chans": "in_channels",
    "num_attention_heads": "num_heads",
    "num_hidden_layers": "depth",
}


def normalize_vision_params(params: dict[str, Any]) -> dict[str, Any]:
    """Config-dict spelling differences shared by Qwen2-VL and Qwen2.5-VL vision configs."""
    out = dict(params)
    for alias, name in _ALIASES.items():
        if alias in out and name not in out:
            out[name] = out[alias]
    if "patch_size" not in out and "spatial_patch_size" in out:
        out["patch_size"] = out["spatial_patch_size"]
    for key in ("patch_size", "temporal_patch_size"):
        if isinstance(out.get(key), (list, tuple)):
            out[key] = int(out[key][0])
    rope = out.get("rope_parameters") or {}
    if "rope_theta" not in out and "rope_theta" in rope:
        out["rope_theta"] = rope["rope_theta"]
    return out


@dataclass
class VisionArgs(BaseModelArgs):
    """Qwen2-VL `vision_config`: `embed_dim` is the tower width, `hidden_size` its output
    (the language model's hidden size) — unlike Qwen2.5-VL, where `hidden_size` is the width.
    """

    depth: int = 32
    embed_dim: int = 1280
    hidden_size: int = 3584
    hidden_act: str = "quick_gelu"
    mlp_ratio: float = 4.0
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    rope_theta: float = 10000.0

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> VisionArgs:
        params = normalize_vision_params(params)
        if "embed_dim" not in params and "out_hidden_size" in params:
            # Written with Qwen2.5-VL names: width in hidden_size, output in out_hidden_size.
            params["embed_dim"] = params.get("hidden_size", cls.embed_dim)
            params["hidden_size"] = params["out_hidden_size"]
        return super().from_dict(params)

    @property
    def out_hidden_size(self) -> int:
        """Output width (same name as Qwen2.5-VL's field)."""
        return self.hidden_size

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)
