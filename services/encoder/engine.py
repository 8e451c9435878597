"""Media bytes -> vision features in the cache, keyed by content (no gRPC in here).

Decoding, preprocessing and the tower run on the process's single MLX thread
(`shared.runtime.mlx_thread`). Items the cache already holds are not recomputed, whoever stored
them: a small in-process memo of refs supplies grid/num_tokens for keys this process has seen
(the cache confirms presence), and for any other key (another replica, or before a restart) the
ref is rebuilt from the entry's header: the metadata written with it and its tensor specs, no
data. Concurrent requests for the same key share one computation.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import mlx.core as mx
import structlog
from mlx.utils import tree_flatten

from services.encoder.keys import content_key, effective_params, model_fingerprint
from services.encoder.types import (
    EncodedItem,
    EntryHeader,
    FeatureRef,
    FeatureStore,
    MediaItemInput,
    TensorInfo,
)
from shared.errors import (
    BackendUnavailableError,
    DeadlineExceededError,
    InvalidRequestError,
    ModelNotServedError,
)
from shared.models.base import MAIN_FEATURES, MediaFeatures
from shared.models.qwen2_vl.messages import MediaRef
from shared.rpc.tensors import dtype_name
from shared.runtime import mlx_thread
from shared.runtime.generate import encode_media
from shared.runtime.loaded import LoadedModel

log = structlog.get_logger("encoder")
T = TypeVar("T")
__all__ = ["EncodedItem", "EncoderEngine", "FeatureRef", "MediaItemInput", "TensorInfo"]


@dataclass
class _Served:
    model: LoadedModel
    fingerprint: str
    dtype: mx.Dtype


class EncoderEngine:
    def __init__(
        self, models: dict[str, LoadedModel], cache: FeatureStore, *, memo_size: int = 65536
    ) -> None:
        for model_id, model in models.items():
            if model.vision is None:
                raise ValueError(f"{model_id}: loaded without a vision tower; nothing to encode")
        self._models = {
            mid: _Served(m, model_fingerprint(m.path), _float_dtype(m.vision))
            for mid, m in models.items()
        }
        self._cache = cache
        self._memo: OrderedDict[str, FeatureRef] = OrderedDict()
        self._memo_size = memo_size
        self._inflight: dict[str, asyncio.Task[tuple[FeatureRef, int]]] = {}
        self.computed = 0  # items that ran the tower (tests and stats)

    @property
    def models(self) -> dict[str, LoadedModel]:
        return {mid: s.model for mid, s in self._models.items()}

    async def encode(
        self,
        model_id: str,
        items: Sequence[MediaItemInput],
        tenant: str = "",
        request_id: str = "",
        *,
        timeout: float | None = None,
    ) -> list[EncodedItem]:
        """Encode `items`; the cache calls share `timeout` (the caller's remaining deadline)."""
        served = self._served(model_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        for item in items:
            if item.modality not in served.model.family.modalities or item.modality == "text":
                accepted = ", ".join(m for m in served.model.family.modalities if m != "text")
                raise InvalidRequestError(
                    f"model {model_id!r} does not accept {item.modality} input; "
                    f"it accepts: {accepted}"
                )
        if not items:
            return []
        keys = await asyncio.to_thread(self._keys, served, items, tenant)  # hashing large bytes
        unique = {k: items[keys.index(k)].modality for k in dict.fromkeys(keys)}
        hits = await _bounded(self._lookup(unique, request_id), deadline)
        results = {k: EncodedItem(ref, cache_hit=True, encode_ns=0) for k, ref in hits.items()}
        todo = {k: items[keys.index(k)] for k in unique if k not in results}
        computed = await asyncio.gather(
            *(self._compute_once(served, k, it, request_id, deadline) for k, it in todo.items())
        )
        for key, (ref, encode_ns) in zip(todo, computed, strict=True):
            results[key] = EncodedItem(ref, cache_hit=False, encode_ns=encode_ns)
        return [results[key] for key in keys]

    def _served(self, model_id: str) -> _Served:
        if model_id not in self._models:
            raise ModelNotServedError(
                f"model {model_id!r} is not served by this encoder; it serves: "
                + ", ".join(self._models)
            )
        return self._models[model_id]

    async def _lookup(self, modalities: dict[str, str], rid: str) -> dict[str, FeatureRef]:
        """Refs of the keys the cache holds. Exactly one cache lookup per key, so its stats count
        each reuse once: keys the memo describes are confirmed in one Contains (the cache is
        authoritative: an evicted entry is recomputed), the rest get a header-only Get."""
        known = {k: self._memo[k] for k in modalities if k in self._memo}  # before any await
        unknown = [k for k in modalities if k not in known]

        async def confirm() -> list[bool]:
            return await self._cache.contains(list(known), request_id=rid) if known else []

        present, *headers = await asyncio.gather(
            confirm(), *(self._cache.head(k, request_id=rid) for k in unknown)
        )
        refs = {k: ref for (k, ref), p in zip(known.items(), present, strict=True) if p}
        for key, header in zip(unknown, headers, strict=True):
            ref = None if header is None else ref_from_header(key, modalities[key], header)
            if ref is not None:
                refs[key] = ref
            elif header is not None:  # counted as a hit by the cache, yet recomputed here
                log.warning("feature_entry_unusable", key=key[:16], metadata=dict(header.metadata))
        for ref in refs.values():
            self._remember(ref)
        return refs

    def _keys(self, served: _Served, items: Sequence[MediaItemInput], tenant: str) -> list[str]:
        processor = served.model.processor
        return [
            content_key(
                served.fingerprint,
                it.modality,
                effective_params(processor, it.modality, it.options),
                it.data,
                tenant,
            )
            for it in items
        ]

    async def _compute_once(
        self, served: _Served, key: str, item: MediaItemInput, rid: str, deadline: float | None
    ) -> tuple[FeatureRef, int]:
        """Compute and store `key`, or wait for the concurrent request already doing so.

        The work is a task of its own, shielded from the requester: if that client goes away the
        features are still stored (a retry will want them) and other waiters are unaffected.
        """
        task = self._inflight.get(key)
        owner = task is None
        if task is None:
            task = asyncio.create_task(self._compute_and_store(served, key, item, rid, deadline))
            self._inflight[key] = task
            task.add_done_callback(lambda t: self._task_done(key, t))
        ref, encode_ns = await asyncio.shield(task)
        return ref, encode_ns if owner else 0

    def _task_done(self, key: str, task: asyncio.Task) -> None:
        self._inflight.pop(key, None)
        if not task.cancelled():
            task.exception()  # retrieved here, so an abandoned failure is not logged as leaked

    async def _compute_and_store(
        self, served: _Served, key: str, item: MediaItemInput, rid: str, deadline: float | None
    ) -> tuple[FeatureRef, int]:
        ref, features, encode_ns = await mlx_thread.run(self._compute, served, key, item)
        meta = ref_metadata(ref)
        stored = await _bounded(
            self._cache.put(key, features.tensors(), metadata=meta, request_id=rid), deadline
        )
        if not stored:
            raise BackendUnavailableError("the cache refused the features (entry too large)")
        self._remember(ref)
        log.info(
            "encoded", key=key[:16], modality=ref.modality, tokens=ref.num_tokens,
            ms=round(encode_ns / 1e6, 2),
        )  # fmt: skip
        return ref, encode_ns

    def _compute(
        self, served: _Served, key: str, item: MediaItemInput
    ) -> tuple[FeatureRef, MediaFeatures, int]:
        """On the MLX thread: decode, preprocess, run the tower, evaluate."""
        start = time.perf_counter_ns()
        model = served.model
        try:
            media = model.processor.load_media(MediaRef(item.modality, item.data, item.options))
        except Exception as exc:  # noqa: BLE001 - undecodable input is the client's error
            raise InvalidRequestError(f"could not decode {item.modality}: {exc}") from exc
        (features,) = encode_media(model, [media])
        features = features.astype(served.dtype)
        tensors = features.tensors()  # "features" first, then any extras (DeepStack levels)
        mx.eval(tensors)
        self.computed += 1
        ref = FeatureRef(
            key=key,
            modality=item.modality,
            num_tokens=features.rows,
            grid=tuple(int(g) for g in media.grid_thw),
            seconds_per_grid=float(media.seconds_per_grid or 0.0),
            tensors=tuple(TensorInfo(n, dtype_name(t), tuple(t.shape)) for n, t in tensors.items()),
        )
        return ref, features, time.perf_counter_ns() - start

    def _remember(self, ref: FeatureRef) -> None:
        self._memo[ref.key] = ref
        self._memo.move_to_end(ref.key)
        while len(self._memo) > self._memo_size:
            self._memo.popitem(last=False)


def ref_metadata(ref: FeatureRef) -> dict[str, str]:
    """What the cache entry carries besides its tensor specs so `ref_from_header` can rebuild
    `ref` (the key is the entry's key, the tensor specs its header's)."""
    return {
        "modality": ref.modality,
        "num_tokens": str(ref.num_tokens),
        "grid": ",".join(map(str, ref.grid)),
        "seconds_per_grid": repr(ref.seconds_per_grid),  # repr: round-trips the float exactly
    }


def ref_from_header(key: str, modality: str, header: EntryHeader) -> FeatureRef | None:
    """The ref `_compute` made for the entry, from its header; None (so: recompute) when a field
    is missing or does not fit the features, e.g. an entry written by an older encoder."""
    meta = dict(header.metadata)  # a proto map would insert "" for a missing field, not raise
    try:
        grid = meta["grid"]
        ref = FeatureRef(
            key=key,
            modality=meta["modality"],
            num_tokens=int(meta["num_tokens"]),
            grid=tuple(int(g) for g in grid.split(",")) if grid else (),
            seconds_per_grid=float(meta["seconds_per_grid"]),
            tensors=tuple(TensorInfo(t.name, t.dtype, tuple(t.shape)) for t in header.tensors),
        )
    except (KeyError, ValueError):
        return None
    # The key hashes the modality, so a mismatch means the metadata is not this entry's own.
    if ref.modality != modality or not ref.tensors or ref.tensors[0].name != MAIN_FEATURES:
        return None
    # Main features first, extras (DeepStack levels) after: every tensor has a row per token.
    return ref if all(t.shape[:1] == (ref.num_tokens,) for t in ref.tensors) else None


def _float_dtype(module: Any) -> mx.Dtype:
    """The tower's floating dtype (quantized towers also hold uint32 weights)."""
    for _, value in tree_flatten(module.parameters()):
        if mx.issubdtype(value.dtype, mx.floating):
            return value.dtype
    return mx.float32


async def _bounded(awaitable: Awaitable[T], deadline: float | None) -> T:
    if deadline is None:
        return await awaitable
    remaining = deadline - time.monotonic()
    try:
        return await asyncio.wait_for(awaitable, max(remaining, 0.001))
    except asyncio.TimeoutError as exc:
        raise DeadlineExceededError("cache call ran past the request deadline") from exc
