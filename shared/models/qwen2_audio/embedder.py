"""Decoder-side half of Qwen2-Audio: put the audio features into the token embeddings.

Positions stay plain 1-D (Qwen2 RoPE continuing from the cache offset), as in transformers
once the processor has expanded the audio placeholders.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from shared.models.merge import PlaceholderEmbedder
from shared.models.qwen2_audio.config import audio_token_id


class AudioEmbedder(PlaceholderEmbedder):
    placeholders = "audio placeholder tokens"
    media_name = "audio"

    def __init__(self, config: dict[str, Any]) -> None:
        self.audio_token_id = audio_token_id(config)
        self.placeholder_ids = [self.audio_token_id]

    def feature_rows(self, feature: Any) -> mx.array:
        """`feature`: one clip's, an array or `MediaFeatures` (its main `features`)."""
        return getattr(feature, "features", feature)
