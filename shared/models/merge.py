"""Decoder-side merge every multimodal family shares: media feature rows replace the token
embeddings at the placeholder positions the processor expanded, one row per placeholder."""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import numpy as np

from shared.media.types import MediaInput
from shared.models.base import LanguageModel, MediaFeatures
from shared.models.registry import PrefillInputs


def embed_prompt(
    language: LanguageModel,
    input_ids: np.ndarray,
    has_media: bool,
    features: Sequence[mx.array],
    placeholder_ids: Sequence[int],
    *,
    placeholders: str,
    media_name: str,
) -> PrefillInputs:
    """A prompt's (1, L) int32 token ids and, when it has media, `language`'s embeddings of
    them with the rows of `features` (one array per item, concatenated in prompt order)
    written at the tokens in `placeholder_ids`. Families that need more (positions, extras)
    set it on the result.

    The counts must match exactly: a mismatch means features computed for other media (or a
    processor that expanded differently), which would silently misplace every later row.
    `placeholders` / `media_name` name the tokens and the features in that error.
    """
    input_ids = np.asarray(input_ids)
    ids = mx.array(input_ids.astype(np.int32))[None]
    if not has_media:
        return PrefillInputs(input_ids=ids)
    slots = np.flatnonzero(np.isin(input_ids, list(placeholder_ids)))
    feats = mx.concatenate(list(features), axis=0)
    if feats.shape[0] != slots.size:
        raise ValueError(
            f"prompt has {slots.size} {placeholders} but the {media_name} features have "
            f"{feats.shape[0]} rows"
        )
    embeds = language.embed(ids)
    embeds[:, mx.array(slots)] = feats.astype(embeds.dtype)[None]
    return PrefillInputs(input_ids=ids, input_embeddings=embeds)


class PlaceholderEmbedder:
    """A `PromptEmbedder` whose media handling starts with `embed_prompt` at the tokens in
    `placeholder_ids` (set by the subclass); a family whose language model needs more
    (positions, extras) adds it in `with_media`."""

    placeholder_ids: list[int]
    placeholders = "image tokens"  # the tokens and features, as the count error names them
    media_name = "image"

    def feature_rows(self, feature: MediaFeatures) -> mx.array:
        """One item's rows to merge: its main features."""
        return feature.features

    def with_media(
        self,
        inputs: PrefillInputs,
        input_ids: np.ndarray,
        media: list[MediaInput],
        features: list[MediaFeatures],
    ) -> PrefillInputs:
        """`inputs` (ids and merged embeddings) completed for a prompt with media."""
        return inputs

    def __call__(
        self,
        language: LanguageModel,
        input_ids: np.ndarray,
        media: list[MediaInput],
        features: list[MediaFeatures],
    ) -> PrefillInputs:
        inputs = embed_prompt(
            language,
            input_ids,
            bool(media),
            [self.feature_rows(f) for f in features],
            self.placeholder_ids,
            placeholders=self.placeholders,
            media_name=self.media_name,
        )
        return self.with_media(inputs, input_ids, media, features) if media else inputs
