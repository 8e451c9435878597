"""Qwen2-Audio config: the audio encoder's fields (config.json `audio_config`) and the ids the
processor and embedder need. The language model is plain Qwen2 (`text_config`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shared.loading.config import text_config
from shared.models.base import BaseModelArgs

# transformers' Qwen2AudioConfig default; published checkpoints store it as `audio_token_index`.
DEFAULT_AUDIO_TOKEN_ID = 151646


@dataclass
class AudioArgs(BaseModelArgs):
    """transformers `Qwen2AudioEncoderConfig` (Whisper-large-v3's encoder in the 7B models)."""

    num_mel_bins: int = 128
    d_model: int = 1280
    encoder_layers: int = 32
    encoder_attention_heads: int = 20
    encoder_ffn_dim: int = 5120
    max_source_positions: int = 1500
    scale_embedding: bool = False
    activation_function: str = "gelu"
    projection_dim: int = 0  # the language model's hidden size (the projector's output)

    def __post_init__(self) -> None:
        if self.activation_function != "gelu":
            raise NotImplementedError(f"audio activation {self.activation_function!r}")
        if self.d_model % self.encoder_attention_heads:
            raise ValueError("audio d_model must be a multiple of encoder_attention_heads")

    @property
    def mel_frames(self) -> int:
        """Mel frames the encoder takes (padded): conv2 halves them to the position count."""
        return self.max_source_positions * 2


def audio_args(config: dict[str, Any]) -> AudioArgs:
    args = AudioArgs.from_dict(dict(config.get("audio_config") or {}))
    args.projection_dim = int(language_config(config)["hidden_size"])
    return args


def audio_token_id(config: dict[str, Any]) -> int:
    for key in ("audio_token_id", "audio_token_index"):
        if config.get(key) is not None:
            return int(config[key])
    return DEFAULT_AUDIO_TOKEN_ID


def output_tokens(frames: int) -> int:
    """LM tokens for `frames` unpadded mel frames: conv2 (stride 2) then the stride-2 average
    pool, as transformers' `_get_feat_extract_output_lengths` and `Qwen2AudioProcessor`."""
    after_conv = (frames - 1) // 2 + 1
    return (after_conv - 2) // 2 + 1


# transformers `Qwen2Config` defaults: the published Qwen2-Audio config.json stores only the
# text fields that differ from them (no hidden_size, layer or head counts).
QWEN2_DEFAULTS: dict[str, Any] = {
    "vocab_size": 151936,
    "hidden_size": 4096,
    "intermediate_size": 22016,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 32768,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}


def language_config(config: dict[str, Any]) -> dict[str, Any]:
    """The Qwen2 language model's fields, defaults filled in."""
    return {**QWEN2_DEFAULTS, **text_config(config)}
