"""Decoder-side half of SmolVLM / Idefics3: put the tile features at the `<image>` tokens.

Positions are the plain 1-D ones of the Llama language model, so nothing else is needed.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np

from shared.loading.config import text_config
from shared.media.types import MediaInput
from shared.models.base import LanguageModel, MediaFeatures
from shared.models.registry import PrefillInputs

# transformers' Idefics3Config / SmolVLMConfig default when config.json does not say.
DEFAULT_IMAGE_TOKEN_ID = 128257


class SmolVLMEmbedder:
    def __init__(self, config: dict[str, Any]) -> None:
        token = config.get("image_token_id", text_config(config).get("image_token_id"))
        self.image_token_id = int(token if token is not None else DEFAULT_IMAGE_TOKEN_ID)

    def __call__(
        self,
        language: LanguageModel,
        input_ids: np.ndarray,
        media: list[MediaInput],
        features: list[MediaFeatures],
    ) -> PrefillInputs:
        input_ids = np.asarray(input_ids)
        ids = mx.array(input_ids.astype(np.int32))[None]
        if not media:
            return PrefillInputs(input_ids=ids)
        slots = np.flatnonzero(input_ids == self.image_token_id)
        feats = mx.concatenate([f.features for f in features], axis=0)
        if feats.shape[0] != slots.size:
            raise ValueError(
                f"prompt has {slots.size} image tokens but the image features have "
                f"{feats.shape[0]} rows"
            )
        embeds = language.embed(ids)
        embeds[:, mx.array(slots)] = feats.astype(embeds.dtype)[None]
        return PrefillInputs(input_ids=ids, input_embeddings=embeds)
