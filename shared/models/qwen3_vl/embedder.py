"""Decoder-side half of Qwen3-VL: merge the main features at the placeholder tokens, lay the
DeepStack levels out per prompt token, and compute the M-RoPE positions.

Positions: transformers splits every video into one (1, h, w) grid per temporal patch (the
frames are separated by timestamp text), so each frame starts its own position block.
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
from shared.models.qwen3_vl.vision import DEEPSTACK_PREFIX
from shared.models.registry import PrefillInputs

DEEPSTACK_EXTRA = "deepstack_embeds"  # the language model's keyword argument


def frame_grids(media: list[MediaInput]) -> list[tuple[int, int, int]]:
    """One (1, h, w) grid per image and per temporal patch of each video, in prompt order."""
    return [(1, h, w) for item in media for t, h, w in [item.grid_thw] for _ in range(t)]


def deepstack_levels(features: list[MediaFeatures]) -> list[mx.array]:
    """Level i of every item, concatenated in prompt order; [] when the items carry none."""
    names = sorted(
        (k for k in features[0].extras if k.startswith(DEEPSTACK_PREFIX)),
        key=lambda k: int(k[len(DEEPSTACK_PREFIX) :]),
    )
    for f in features:
        if sorted(f.extras) != sorted(names):
            raise ValueError("media items carry different DeepStack levels")
    return [mx.concatenate([f.extras[n] for f in features], axis=0) for n in names]


class Qwen3VLEmbedder(PlaceholderEmbedder):
    placeholders = "media placeholder tokens"
    media_name = "media"

    def __init__(self, config: dict[str, Any]) -> None:
        text, vision = text_config(config), vision_config(config)
        self.image_token_id = int(text["image_token_id"])
        self.video_token_id = int(text["video_token_id"])
        self.placeholder_ids = [self.image_token_id, self.video_token_id]
        self.merge_size = int(vision.get("spatial_merge_size", 2))
        # transformers' default taps (8, 16, 24) when the config does not list them.
        self.levels = len(vision.get("deepstack_visual_indexes", (8, 16, 24)))

    def with_media(
        self,
        inputs: PrefillInputs,
        input_ids: np.ndarray,
        media: list[MediaInput],
        features: list[MediaFeatures],
    ) -> PrefillInputs:
        input_ids = np.asarray(input_ids, dtype=np.int32)
        embeds = inputs.input_embeddings  # set: the prompt has media
        levels = deepstack_levels(features)
        if len(levels) != self.levels:  # e.g. features written for another tower
            raise ValueError(
                f"media features carry {len(levels)} DeepStack levels; this model needs "
                f"{self.levels}"
            )
        if levels:
            is_media = (input_ids == self.image_token_id) | (input_ids == self.video_token_id)
            slots = mx.array(np.flatnonzero(is_media).astype(np.int32))
            stacked = mx.stack(levels).astype(embeds.dtype)  # (levels, n_slots, D)
            dense = mx.zeros((stacked.shape[0], len(input_ids), stacked.shape[2]), embeds.dtype)
            dense[:, slots] = stacked
            inputs.extras[DEEPSTACK_EXTRA] = dense
        positions, delta = get_rope_index(
            input_ids,
            frame_grids(media),
            image_token_id=self.image_token_id,
            video_token_id=self.video_token_id,
            spatial_merge_size=self.merge_size,
        )
        inputs.position_ids = mx.array(positions.astype(np.int32))[:, None, :]
        inputs.rope_delta = int(delta)
        return inputs
