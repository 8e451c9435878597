"""What goes in and out of the encoder engine (plain data; the servicer maps it to protos)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import mlx.core as mx
from prism.v1.cache_pb2 import EntryHeader


class FeatureStore(Protocol):
    """The part of `services.cache.client.CacheClient` the encoder uses."""

    async def put(
        self, key: str, tensors: dict[str, mx.array], *, namespace: str = ...,
        metadata: dict[str, str] | None = ..., request_id: str = ...,
    ) -> bool: ...  # fmt: skip

    async def contains(
        self, keys: list[str], *, namespace: str = ..., request_id: str = ...
    ) -> list[bool]: ...

    async def head(
        self, key: str, *, namespace: str = ..., request_id: str = ...
    ) -> EntryHeader | None: ...


@dataclass(frozen=True)
class MediaItemInput:
    modality: str  # "image" | "video" | "audio"
    data: bytes
    options: dict[str, float] = field(default_factory=dict)  # only the options the client set


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class FeatureRef:
    key: str
    modality: str
    num_tokens: int
    grid: tuple[int, ...]
    seconds_per_grid: float
    tensors: tuple[TensorInfo, ...]


@dataclass(frozen=True)
class EncodedItem:
    ref: FeatureRef
    cache_hit: bool
    encode_ns: int
