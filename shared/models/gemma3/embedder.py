"""Decoder-side half of Gemma 3: put image features into the scaled token embeddings and tell
the language model which tokens belong to which image (for their bidirectional attention)."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np

from shared.loading.config import text_config
from shared.media.types import MediaInput
from shared.models.base import MediaFeatures
from shared.models.merge import PlaceholderEmbedder
from shared.models.registry import PrefillInputs


def image_blocks(is_image: np.ndarray) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Each token's image index (-1 for text) and the [start, end) span of every image run
    (transformers' `get_block_sequence_ids_for_mask`: a run of image tokens is one block)."""
    starts = np.flatnonzero(is_image & ~np.concatenate([[False], is_image[:-1]]))
    ends = np.flatnonzero(is_image & ~np.concatenate([is_image[1:], [False]])) + 1
    blocks = np.where(is_image, np.cumsum(np.isin(np.arange(len(is_image)), starts)) - 1, -1)
    return blocks.astype(np.int32), list(zip(starts.tolist(), ends.tolist(), strict=True))


class Gemma3Embedder(PlaceholderEmbedder):
    def __init__(self, config: dict[str, Any]) -> None:
        text = text_config(config)
        self.image_token_id = int(text.get("image_token_index", text.get("image_token_id", -1)))
        self.placeholder_ids = [self.image_token_id]

    def with_media(
        self,
        inputs: PrefillInputs,
        input_ids: np.ndarray,
        media: list[MediaInput],
        features: list[MediaFeatures],
    ) -> PrefillInputs:
        blocks, spans = image_blocks(np.asarray(input_ids) == self.image_token_id)
        inputs.extras = {"image_blocks": mx.array(blocks)[None]}
        inputs.atomic_spans = spans
        return inputs
