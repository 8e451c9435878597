"""Decoder-side half of Qwen2-Audio: put the audio features into the token embeddings.

Positions stay plain 1-D (Qwen2 RoPE continuing from the cache offset), as in transformers
once the processor has expanded the audio placeholders.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np

from shared.media.types import MediaInput
from shared.models.base import LanguageModel
from shared.models.qwen2_audio.config import audio_token_id
from shared.models.registry import PrefillInputs


class AudioEmbedder:
    def __init__(self, config: dict[str, Any]) -> None:
        self.audio_token_id = audio_token_id(config)

    def __call__(
        self,
        language: LanguageModel,
        input_ids: np.ndarray,
        media: list[MediaInput],
        features: list[Any],
    ) -> PrefillInputs:
        """`features`: one per clip, an array or `MediaFeatures` (its main `features`)."""
        input_ids = np.asarray(input_ids)
        ids = mx.array(input_ids.astype(np.int32))[None]
        if not media:
            return PrefillInputs(input_ids=ids)
        slots = np.flatnonzero(input_ids == self.audio_token_id)
        feats = mx.concatenate([getattr(f, "features", f) for f in features], axis=0)
        if feats.shape[0] != slots.size:
            raise ValueError(
                f"prompt has {slots.size} audio placeholder tokens but the audio features "
                f"have {feats.shape[0]} rows"
            )
        embeds = language.embed(ids)
        embeds[:, mx.array(slots)] = feats.astype(embeds.dtype)[None]
        return PrefillInputs(input_ids=ids, input_embeddings=embeds)
