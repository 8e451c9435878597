"""Contracts every model family implements, and the small helpers they share."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import mlx.core as mx


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


@runtime_checkable
class VisionTower(Protocol):
    """Pixels (flattened patches, as the processor emits them) in, language-model embeddings out.

    `grid_thw` is (N, 3): temporal, height and width patch counts for each image or video.
    Returns (sum over items of t*h*w / merge**2, lm_hidden_size).
    """

    def __call__(self, pixel_values: mx.array, grid_thw: mx.array) -> mx.array: ...

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]: ...
