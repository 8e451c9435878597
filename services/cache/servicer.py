"""prism.v1.Cache over gRPC: proto <-> `TieredStore`, nothing else.

Store calls that may block (disk reads, oversize puts, locks a disk writer holds) run in
worker threads so one slow disk never stalls the event loop that serves every other call.

Stats semantics: Get (with or without header_only) and Contains are all lookups. A key found
counts one hit of the tier that holds it (TierStats.hits) and refreshes its LRU position; a key
absent counts one miss. The encoder never Gets its own features: it decides "already encoded" by
one lookup per key (Contains when it remembers the entry's ref, a header-only Get when it must
rebuild the ref from the entry's metadata), and that lookup is the hit a reused feature shows.
A caller that Contains a key and then Gets it counts two hits.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import grpc
from prism.v1 import cache_pb2, cache_pb2_grpc, common_pb2

from services.cache.store import (
    DTYPE_SIZES,
    CacheStats,
    Entry,
    EntryNotFoundError,
    TensorData,
    TierStats,
    tensor_nbytes,
)
from services.cache.tiered import TieredStore
from shared.errors import InvalidRequestError
from shared.rpc.tensors import CHUNK_BYTES

DEFAULT_NAMESPACE = "features"
MAX_KEY_CHARS = 1024
MAX_METADATA_BYTES = 64 * 1024  # metadata rides in the safetensors header: keep it small


def _check_header(header: cache_pb2.EntryHeader) -> list[tuple[str, str, tuple[int, ...]]]:
    """Validate a Put header; returns (name, dtype, shape) per tensor in wire order."""
    if not header.key or len(header.key) > MAX_KEY_CHARS:
        raise InvalidRequestError(f"key must be 1..{MAX_KEY_CHARS} characters", param="key")
    meta_size = sum(len(k) + len(v) for k, v in header.metadata.items())
    if meta_size > MAX_METADATA_BYTES:
        raise InvalidRequestError(f"metadata over {MAX_METADATA_BYTES} bytes", param="metadata")
    if not header.tensors:
        raise InvalidRequestError("an entry needs at least one tensor", param="tensors")
    specs, seen = [], set()
    for t in header.tensors:
        if not t.name or t.name in seen or t.name == "__metadata__":
            raise InvalidRequestError(f"bad or duplicate tensor name {t.name!r}", param="tensors")
        if t.dtype not in DTYPE_SIZES:
            raise InvalidRequestError(f"unsupported dtype {t.dtype!r}", param="tensors")
        if any(s < 0 for s in t.shape):
            raise InvalidRequestError(f"negative dimension in {t.name!r}", param="tensors")
        seen.add(t.name)
        specs.append((t.name, t.dtype, tuple(int(s) for s in t.shape)))
    return specs


def entry_header(entry: Entry) -> cache_pb2.EntryHeader:
    """What Get sends ahead of the data: tensor specs in wire order and the metadata."""
    specs = [
        common_pb2.TensorSpec(name=name, dtype=t.dtype, shape=t.shape)
        for name, t in entry.tensors.items()
    ]
    return cache_pb2.EntryHeader(
        key=entry.key, namespace=entry.namespace, tensors=specs, metadata=entry.metadata
    )


def _tier(stats: TierStats) -> cache_pb2.TierStats:
    return cache_pb2.TierStats(
        entries=stats.entries,
        bytes=stats.bytes,
        capacity_bytes=stats.capacity,
        hits=stats.hits,
        evictions=stats.evictions,
    )


def stats_to_proto(stats: CacheStats) -> cache_pb2.CacheStatsResponse:
    return cache_pb2.CacheStatsResponse(
        memory=_tier(stats.memory),
        disk=_tier(stats.disk),
        misses=stats.misses,
        puts=stats.puts,
        disk_errors=stats.disk_errors,
    )


class CacheServicer(cache_pb2_grpc.CacheServicer):
    def __init__(self, store: TieredStore) -> None:
        self.store = store

    async def Put(  # noqa: N802 - gRPC method names
        self, request_iterator: AsyncIterator[cache_pb2.PutChunk], context: grpc.aio.ServicerContext
    ) -> cache_pb2.PutResponse:
        header, specs, buf, received = None, [], bytearray(), 0
        async for chunk in request_iterator:
            part = chunk.WhichOneof("part")
            if part == "header":
                if header is not None:
                    raise InvalidRequestError("a Put stream carries exactly one header")
                header, specs = chunk.header, _check_header(chunk.header)
                # One allocation up front: chunks are copied in place, never re-grown.
                buf = bytearray(sum(tensor_nbytes(d, s) for _, d, s in specs))
            elif part == "data":
                if header is None:
                    raise InvalidRequestError("the header must come before the data")
                end = received + len(chunk.data)
                if end > len(buf):  # refuse as soon as it overflows, before buffering the rest
                    raise InvalidRequestError(f"more than the {len(buf)} bytes the header declares")
                buf[received:end] = chunk.data
                received = end
        if header is None:
            raise InvalidRequestError("empty Put stream: no header")
        if received != len(buf):
            raise InvalidRequestError(f"got {received} bytes, the header declares {len(buf)}")
        tensors, pos = {}, 0
        view = memoryview(buf)
        for name, dtype, shape in specs:
            end = pos + tensor_nbytes(dtype, shape)
            tensors[name] = TensorData(dtype, shape, bytes(view[pos:end]))
            pos = end
        view.release()
        namespace = header.namespace or DEFAULT_NAMESPACE
        entry = Entry(header.key, namespace, tensors, dict(header.metadata))
        stored = await asyncio.to_thread(self.store.put, entry)
        return cache_pb2.PutResponse(stored_bytes=entry.nbytes if stored else 0, stored=stored)

    async def Get(  # noqa: N802
        self, request: cache_pb2.GetRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[cache_pb2.GetChunk]:
        """The entry, or with `header_only` just its header. Either is one lookup in Stats."""
        namespace = request.namespace or DEFAULT_NAMESPACE
        # header_only reads a disk entry whole all the same: the checksum covers the data, so a
        # corrupt file is dropped here rather than announced as present, and the promotion to
        # memory serves the full Get that usually follows (the decoder fetching the features).
        entry = await asyncio.to_thread(self.store.get, namespace, request.key)
        if entry is None:
            raise EntryNotFoundError(f"no entry {request.key!r} in namespace {namespace!r}")
        yield cache_pb2.GetChunk(header=entry_header(entry))
        if request.header_only:
            return
        for t in entry.tensors.values():
            view = memoryview(t.data)
            for start in range(0, len(view), CHUNK_BYTES):
                yield cache_pb2.GetChunk(data=bytes(view[start : start + CHUNK_BYTES]))

    async def Contains(  # noqa: N802
        self, request: cache_pb2.ContainsRequest, context: grpc.aio.ServicerContext
    ) -> cache_pb2.ContainsResponse:
        """Presence per key; counted in Stats like a Get (hit or miss, LRU refreshed)."""
        namespace = request.namespace or DEFAULT_NAMESPACE
        present = await asyncio.to_thread(self.store.contains, namespace, list(request.keys))
        return cache_pb2.ContainsResponse(present=present)

    async def Stats(  # noqa: N802
        self, request: cache_pb2.CacheStatsRequest, context: grpc.aio.ServicerContext
    ) -> cache_pb2.CacheStatsResponse:
        return stats_to_proto(await asyncio.to_thread(self.store.stats, request.namespace))

    async def Reset(  # noqa: N802
        self, request: cache_pb2.CacheResetRequest, context: grpc.aio.ServicerContext
    ) -> cache_pb2.CacheResetResponse:
        removed = await asyncio.to_thread(self.store.reset, request.namespace)
        return cache_pb2.CacheResetResponse(removed_entries=removed)


def add_cache_servicer(store: TieredStore) -> Callable[[grpc.aio.Server], list[str]]:
    """The `add_servicers` callback PrismServer takes."""

    def add(server: grpc.aio.Server) -> list[str]:
        cache_pb2_grpc.add_CacheServicer_to_server(CacheServicer(store), server)
        return ["prism.v1.Cache"]

    return add
