"""Async client of the cache service (used by the encoder and decoder).

Tensors travel as a header plus 1 MiB chunks both ways, so no entry ever meets gRPC's message
size limit. Every call carries a deadline and the request id; a cache that is down or too slow
surfaces as `BackendUnavailableError`, which callers may treat as a cache miss.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import grpc
import mlx.core as mx
from prism.v1 import cache_pb2, cache_pb2_grpc, common_pb2

from shared.errors import BackendUnavailableError, InvalidRequestError, PrismError
from shared.rpc import tensors as wire
from shared.rpc.channels import aio_channel, request_metadata

_UNAVAILABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def _translate(exc: grpc.aio.AioRpcError, address: str) -> PrismError:
    if exc.code() in _UNAVAILABLE:
        return BackendUnavailableError(f"cache {address}: {exc.code().name}: {exc.details()}")
    if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidRequestError(f"cache refused: {exc.details()}")
    return PrismError(f"cache {address}: {exc.code().name}: {exc.details()}")


def _rid(request_id: str) -> tuple[tuple[str, str], ...]:
    # Always send one, so the cache's log lines can be joined even for untraced calls.
    return request_metadata(request_id or uuid.uuid4().hex)


class CacheClient:
    def __init__(self, address: str, *, timeout: float = 30.0) -> None:
        self.address = address
        self.timeout = timeout
        self._channel: grpc.aio.Channel | None = None
        self._stub: cache_pb2_grpc.CacheStub | None = None

    @property
    def stub(self) -> cache_pb2_grpc.CacheStub:
        # Created on first use so the channel binds to the event loop that actually runs it.
        if self._stub is None:
            self._channel = aio_channel(self.address)
            self._stub = cache_pb2_grpc.CacheStub(self._channel)
        return self._stub

    async def put(
        self,
        key: str,
        tensors: dict[str, mx.array],
        *,
        namespace: str = "features",
        metadata: dict[str, str] | None = None,
        request_id: str = "",
    ) -> bool:
        """Store `tensors` under `key`; False if the cache had no room for the entry."""
        blobs = {name: wire.to_bytes(a) for name, a in tensors.items()}
        specs = [
            common_pb2.TensorSpec(name=name, dtype=wire.dtype_name(a), shape=a.shape)
            for name, a in tensors.items()
        ]
        header = cache_pb2.EntryHeader(
            key=key, namespace=namespace, tensors=specs, metadata=metadata or {}
        )

        async def chunks() -> AsyncIterator[cache_pb2.PutChunk]:
            yield cache_pb2.PutChunk(header=header)
            for blob in blobs.values():
                for part in wire.chunks(blob):
                    yield cache_pb2.PutChunk(data=part)

        try:
            reply = await self.stub.Put(chunks(), timeout=self.timeout, metadata=_rid(request_id))
        except grpc.aio.AioRpcError as exc:
            raise _translate(exc, self.address) from exc
        return reply.stored

    async def get(
        self, key: str, *, namespace: str = "features", request_id: str = ""
    ) -> dict[str, mx.array] | None:
        """The tensors stored under `key`, or None when the cache does not hold it."""
        found = await self._get(cache_pb2.GetRequest(key=key, namespace=namespace), request_id)
        return None if found is None else _split(found[0], b"".join(found[1]))

    async def head(
        self, key: str, *, namespace: str = "features", request_id: str = ""
    ) -> cache_pb2.EntryHeader | None:
        """The header stored under `key` (tensor specs and metadata, no data), or None when the
        cache does not hold it. Counts in the cache's stats as one lookup, like `get`."""
        request = cache_pb2.GetRequest(key=key, namespace=namespace, header_only=True)
        found = await self._get(request, request_id)
        return None if found is None else found[0]

    async def _get(
        self, request: cache_pb2.GetRequest, request_id: str
    ) -> tuple[cache_pb2.EntryHeader, list[bytes]] | None:
        """One Get stream: (header, data chunks), or None on NOT_FOUND. With `header_only`,
        data a cache streams anyway (one too old to know the flag) is not read."""
        header, parts = None, []
        try:
            call = self.stub.Get(request, timeout=self.timeout, metadata=_rid(request_id))
            async for chunk in call:
                if chunk.WhichOneof("part") == "header":
                    header = chunk.header
                elif request.header_only:
                    call.cancel()
                    break
                else:
                    parts.append(chunk.data)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise _translate(exc, self.address) from exc
        if header is None:
            raise PrismError(f"cache {self.address}: Get stream without a header")
        return header, parts

    async def contains(
        self, keys: list[str], *, namespace: str = "features", request_id: str = ""
    ) -> list[bool]:
        request = cache_pb2.ContainsRequest(keys=keys, namespace=namespace)
        try:
            reply = await self.stub.Contains(
                request, timeout=self.timeout, metadata=_rid(request_id)
            )
        except grpc.aio.AioRpcError as exc:
            raise _translate(exc, self.address) from exc
        return list(reply.present)

    async def stats(self, namespace: str = "") -> cache_pb2.CacheStatsResponse:
        request = cache_pb2.CacheStatsRequest(namespace=namespace)
        try:
            return await self.stub.Stats(request, timeout=self.timeout, metadata=_rid(""))
        except grpc.aio.AioRpcError as exc:
            raise _translate(exc, self.address) from exc

    async def reset(self, namespace: str = "") -> int:
        request = cache_pb2.CacheResetRequest(namespace=namespace)
        try:
            reply = await self.stub.Reset(request, timeout=self.timeout, metadata=_rid(""))
        except grpc.aio.AioRpcError as exc:
            raise _translate(exc, self.address) from exc
        return reply.removed_entries

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
        self._channel = self._stub = None


def _split(header: cache_pb2.EntryHeader, data: bytes) -> dict[str, mx.array]:
    """Cut the concatenated bytes back into the header's tensors, in header order."""
    out, pos = {}, 0
    view = memoryview(data)
    for spec in header.tensors:
        end = pos + _nbytes(spec.dtype, spec.shape)
        out[spec.name] = wire.from_bytes(view[pos:end], spec.dtype, spec.shape)
        pos = end
    if pos != len(data):
        raise PrismError(f"cache sent {len(data)} bytes, the header declares {pos}")
    return out


def _nbytes(dtype: str, shape: list[int]) -> int:
    # MLX spells the boolean dtype `bool_`; dtype_name() reports it as "bool".
    return wire.nbytes("bool_" if dtype == "bool" else dtype, shape)
