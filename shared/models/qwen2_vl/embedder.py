"""Decoder-side half of Qwen2-VL / Qwen2.5-VL: put vision features into the token embeddings
and compute the M-RoPE positions for the prompt.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np

from shared.loading.config import text_config, vision_config
from shared.media.types import MediaInput
from shared.models.base import MediaFeatures
from shared.models.merge import PlaceholderEmbedder
from shared.models.qwen2_vl.rope_index import get_rope_index
from shared.models.registry import PrefillInputs


class QwenVLEmbedder(PlaceholderEmbedder):
    placeholders = "media placeholder tokens"
    media_name = "media"

    def __init__(self, config: dict[str, Any], *, timed_video: bool) -> None:
        text, vision = text_config(config), vision_config(config)
        self.image_token_id = int(text["image_token_id"])
        self.video_token_id = int(text["video_token_id"])
        self.placeholder_ids = [self.image_token_id, self.video_token_id]
        self.vision_start_token_id = int(text["vision_start_token_id"])
        self.merge_size = int(vision.get("spatial_merge_size", 2))
        # Qwen2.5-VL spaces video frames on the temporal axis by wall-clock time; Qwen2-VL by index.
        self.tokens_per_second = (
            float(vision.get("tokens_per_second", text.get("tokens_per_second", 2)))
            if timed_video
            else None
        )

    def with_media(
        self,
        inputs: PrefillInputs,
        input_ids: np.ndarray,
        media: list[MediaInput],
        features: list[MediaFeatures],
    ) -> PrefillInputs:
        positions, delta = get_rope_index(
            np.asarray(input_ids),
            media,
            image_token_id=self.image_token_id,
            video_token_id=self.video_token_id,
            vision_start_token_id=self.vision_start_token_id,
            spatial_merge_size=self.merge_size,
            tokens_per_second=self.tokens_per_second,
        )
        inputs.position_ids = mx.array(positions.astype(np.int32))[:, None, :]
        inputs.rope_delta = int(delta)
        return inputs
