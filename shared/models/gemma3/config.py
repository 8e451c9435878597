"""Gemma 3 arguments from config.json: the text model, the SigLIP tower and the projector.

Published configs (google/gemma-3-*) leave most text fields to transformers' defaults, so the
defaults here are `Gemma3TextConfig`'s and `SiglipVisionConfig`'s. Both rope spellings occur:
transformers-4 (`rope_theta`, `rope_local_base_freq`, `rope_scaling` for global layers) and
transformers-5 (`rope_parameters` keyed by layer type).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shared.models.base import BaseModelArgs
from shared.models.rope import RoPE, initialize_rope

SLIDING, FULL = "sliding_attention", "full_attention"


@dataclass
class TextArgs(BaseModelArgs):
    """The flat text config (`text_config` merged over the root by the loader)."""

    hidden_size: int = 2304
    num_hidden_layers: int = 26
    intermediate_size: int = 9216
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    vocab_size: int = 262_208
    model_type: str = "gemma3_text"
    rms_norm_eps: float = 1e-6
    hidden_activation: str = "gelu_pytorch_tanh"
    query_pre_attn_scalar: float = 256
    sliding_window: int = 4096
    sliding_window_pattern: int = 6
    layer_types: list[str] | None = None
    rope_theta: float = 1_000_000.0
    rope_local_base_freq: float = 10_000.0
    rope_scaling: dict[str, Any] | None = None
    rope_parameters: dict[str, Any] | None = None
    attention_bias: bool = False
    final_logit_softcapping: float | None = None
    # Read but unused: transformers' Gemma 3 attention never applies it (Gemma 2's did).
    attn_logit_softcapping: float | None = None
    tie_word_embeddings: bool = True
    use_bidirectional_attention: bool | None = False

    def __post_init__(self) -> None:
        if self.layer_types is None:  # transformers' rule for the integer pattern
            pattern = self.sliding_window_pattern
            self.layer_types = [
                SLIDING if (i + 1) % pattern else FULL for i in range(self.num_hidden_layers)
            ]
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"{len(self.layer_types)} layer_types for {self.num_hidden_layers}")
        if self.hidden_activation != "gelu_pytorch_tanh":
            raise NotImplementedError(f"hidden_activation {self.hidden_activation!r}")
        if self.use_bidirectional_attention:  # EmbeddingGemma, an encoder: not served here
            raise NotImplementedError("use_bidirectional_attention (embedding models)")
        if self.tie_word_embeddings is None:
            self.tie_word_embeddings = True

    def make_rope(self, layer_type: str) -> RoPE:
        """Sliding layers: plain rope at the local base; global layers: theta + scaling."""
        nested = self.rope_parameters or {}
        if FULL in nested or SLIDING in nested:  # transformers-5: one dict per layer type
            params = dict(nested.get(layer_type) or {})
            default = self.rope_theta if layer_type == FULL else self.rope_local_base_freq
            params.setdefault("rope_theta", default)
            return initialize_rope(self.head_dim, None, None, params)
        if layer_type == SLIDING:
            return initialize_rope(self.head_dim, self.rope_local_base_freq)
        flat = nested or None  # a flat rope_parameters describes the global layers
        return initialize_rope(self.head_dim, self.rope_theta, self.rope_scaling, flat)


@dataclass
class VisionArgs(BaseModelArgs):
    """SigLIP `vision_config` (Gemma 3 uses it without the pooling head)."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 896
    patch_size: int = 14
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size


@dataclass
class ProjectorArgs:
    """The multi-modal projector: SigLIP patches avg-pooled to `mm_tokens_per_image`."""

    vision: VisionArgs
    text_hidden_size: int
    mm_tokens_per_image: int = 256

    @property
    def tokens_per_side(self) -> int:
        return int(self.mm_tokens_per_image**0.5)

    @property
    def kernel_size(self) -> int:
        return self.vision.patches_per_side // self.tokens_per_side
