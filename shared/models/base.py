"""Contracts every model family implements, and the small helpers they share."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import mlx.core as mx
import numpy as np


@dataclass
class BaseModelArgs:
    """A dataclass built from a config dict, ignoring keys it does not declare (as mlx-lm does)."""

    @classmethod
    def from_dict(cls, params: dict[str, Any]):
        fields = inspect.signature(cls).parameters
        return cls(**{k: v for k, v in params.items() if k in fields})


@runtime_checkable
class Cache(Protocol):
    """One per attention layer; owns that layer's keys and values."""

    offset: int

    @property
    def state(self) -> Any: ...

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]: ...


@runtime_checkable
class LanguageModel(Protocol):
    """A decoder-only language model: token ids or embeddings in, logits out.

    `position_ids` is (B, L) for 1-D rotary models and (3, B, L) for multimodal rotary
    (M-RoPE); when omitted, positions continue from the cache offset.
    """

    def __call__(
        self,
        inputs: mx.array | None,
        cache: list[Cache] | None = None,
        *,
        input_embeddings: mx.array | None = None,
        position_ids: mx.array | None = None,
    ) -> mx.array: ...

    def embed(self, input_ids: mx.array) -> mx.array: ...

    def make_cache(self) -> list[Cache]: ...

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]: ...


MAIN_FEATURES = "features"  # the tensor merged at the placeholder tokens


@dataclass
class MediaFeatures:
    """Encoder output for media: `features` (rows, D) go in at the placeholder tokens; `extras`
    are named tensors with the same rows that the language model uses elsewhere (Qwen3-VL's
    DeepStack levels "deepstack.0", ...). The cache stores each as a tensor of one entry.
    """

    features: mx.array
    extras: dict[str, mx.array] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return int(self.features.shape[0])

    def tensors(self) -> dict[str, mx.array]:
        """Every tensor by name, main features first (the cache entry's wire order)."""
        return {MAIN_FEATURES: self.features, **self.extras}

    @classmethod
    def from_tensors(cls, tensors: dict[str, mx.array]) -> MediaFeatures:
        rest = {k: v for k, v in tensors.items() if k != MAIN_FEATURES}
        return cls(tensors[MAIN_FEATURES], rest)

    def split(self, sizes: list[int]) -> list[MediaFeatures]:
        """Per-item features from a batched tower call (`sizes`: rows of each item)."""
        cuts = [int(c) for c in np.cumsum(sizes)[:-1]]
        parts = {k: mx.split(v, cuts, axis=0) if cuts else [v] for k, v in self.tensors().items()}
        return [
            MediaFeatures.from_tensors({k: v[i] for k, v in parts.items()})
            for i in range(len(sizes))
        ]

    def astype(self, dtype: mx.Dtype) -> MediaFeatures:
        return MediaFeatures.from_tensors({k: v.astype(dtype) for k, v in self.tensors().items()})


@runtime_checkable
class VisionTower(Protocol):
    """Pixels (flattened patches, as the processor emits them) in, language-model embeddings out.

    `grid_thw` is (N, 3): temporal, height and width patch counts for each image or video.
    Returns (sum over items of t*h*w / merge**2, lm_hidden_size), or `MediaFeatures` with
    those rows when the tower also yields extra per-row tensors (Qwen3-VL's DeepStack).
    """

    def __call__(self, pixel_values: mx.array, grid_thw: mx.array) -> mx.array | MediaFeatures: ...

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]: ...
