"""SmolVLM / Idefics3 arguments from config.json: the vision tower and the connector.

The tower is SigLIP's (as Gemma 3 uses it), so its arguments are Gemma 3's `VisionArgs` with
transformers' `Idefics3VisionConfig` / `SmolVLMVisionConfig` defaults. The language model is a
plain Llama (`text_config`), built by `shared.models.llama`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shared.loading.config import text_config, vision_config
from shared.models.gemma3.config import VisionArgs as SiglipArgs


@dataclass
class VisionArgs(SiglipArgs):
    """`vision_config`, defaults as transformers' Idefics3/SmolVLM vision configs."""

    hidden_size: int = 1152
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 32


@dataclass
class TowerArgs:
    """What the encoder half needs: the SigLIP tower, the pixel shuffle and the projection."""

    vision: VisionArgs
    text_hidden_size: int
    scale_factor: int = 2

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> TowerArgs:
        return cls(
            vision=VisionArgs.from_dict(vision_config(config)),
            text_hidden_size=int(text_config(config)["hidden_size"]),
            scale_factor=int(config.get("scale_factor") or 2),
        )

    @property
    def tokens_per_tile(self) -> int:
        """transformers' `image_seq_len`: (patches per side / scale)^2."""
        return (self.vision.patches_per_side // self.scale_factor) ** 2
