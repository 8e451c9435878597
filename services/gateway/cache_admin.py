"""GET /v1/cache/stats and POST /v1/cache/reset: every decoder's prefix cache (APC) and the
cache service's namespaces ("kv": prefix KV blocks, "features": vision features) in one place.

Stats are best effort: a decoder or cache service that does not answer is left out (logged),
so the page still shows what is reachable. Reset is not: a failure is the client's error (a
reset is idempotent, so retrying is safe), since a silently partial reset would look done.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import structlog
from fastapi import Request
from prism.v1 import cache_pb2, cache_pb2_grpc, decoder_pb2
from pydantic import BaseModel, ConfigDict, StrictBool

from services.gateway.backends import Backend, BackendPools
from services.gateway.common import parse_body, request_id
from services.gateway.errors import BadGatewayError
from services.gateway.rpc_errors import rpc_error
from shared.errors import BackendUnavailableError, PrismError
from shared.rpc.channels import aio_channel, request_metadata

log = structlog.get_logger("gateway")

NAMESPACES = ("kv", "features")
TIER_FIELDS = ("entries", "bytes", "capacity_bytes", "hits", "evictions")
PREFIX_COUNTERS = (
    "queries",
    "query_tokens",
    "matched_tokens",
    "memory_hits",
    "remote_hits",
    "misses",
    "blocks_written",
)
# Per gRPC call: these are bookkeeping calls, an answer takes milliseconds.
ADMIN_TIMEOUT = 10.0


class CacheService:
    """The gateway's own channel to the cache service, for stats and reset only.

    Not services/cache/client.py's CacheClient: that one imports MLX for its tensor helpers,
    and the gateway stays free of MLX. Create it inside the serving event loop (lifespan).
    """

    def __init__(self, address: str, timeout: float) -> None:
        self.address, self.timeout = address, timeout
        self.channel = aio_channel(address)
        self.stub = cache_pb2_grpc.CacheStub(self.channel)

    async def stats(self, namespace: str, rid: str) -> cache_pb2.CacheStatsResponse:
        req = cache_pb2.CacheStatsRequest(namespace=namespace)
        return await self.stub.Stats(req, timeout=self.timeout, metadata=request_metadata(rid))

    async def reset(self, namespace: str, rid: str) -> int:
        req = cache_pb2.CacheResetRequest(namespace=namespace)
        reply = await self.stub.Reset(req, timeout=self.timeout, metadata=request_metadata(rid))
        return int(reply.removed_entries)

    async def close(self) -> None:
        await self.channel.close()


class CacheResetBody(BaseModel):
    # Unknown fields are refused: a typo ("feature") must not silently reset something else.
    model_config = ConfigDict(extra="forbid")
    prefix: StrictBool = True
    features: StrictBool = False


def _rpc_text(err: grpc.aio.AioRpcError) -> str:
    return f"{err.code().name}: {err.details()}"


def _decoders(pools: BackendPools) -> list[Backend]:
    return [b for b in pools.backends if b.kind == "decoder" and b.healthy]


def _tier_json(tier: cache_pb2.TierStats) -> dict[str, int]:
    return {f: int(getattr(tier, f)) for f in TIER_FIELDS}


def prefix_cache_json(replies: list[decoder_pb2.PrefixCacheStatsResponse]) -> dict[str, Any]:
    """Every answering decoder's APC numbers, summed."""
    totals = {f: sum(int(getattr(r, f)) for r in replies) for f in PREFIX_COUNTERS}
    enabled = [r for r in replies if r.enabled]
    queried = totals["query_tokens"]
    return {
        "enabled": bool(enabled),
        # The same for every replica of a deployment; 0 when no decoder has APC on.
        "block_size": next((int(r.block_size) for r in enabled if r.block_size), 0),
        "decoders": len(replies),
        **totals,
        "hit_rate": totals["matched_tokens"] / queried if queried else 0.0,
        "memory": {f: sum(int(getattr(r.memory, f)) for r in replies) for f in TIER_FIELDS},
    }


def cache_service_json(stats: cache_pb2.CacheStatsResponse) -> dict[str, Any]:
    return {
        "memory": _tier_json(stats.memory),
        "disk": _tier_json(stats.disk),
        "misses": int(stats.misses),
        "puts": int(stats.puts),
        "disk_errors": int(stats.disk_errors),
    }


async def _decoder_stats(b: Backend, rid: str) -> decoder_pb2.PrefixCacheStatsResponse | None:
    try:
        return await b.stub.PrefixCacheStats(
            decoder_pb2.PrefixCacheStatsRequest(),
            timeout=ADMIN_TIMEOUT,
            metadata=request_metadata(rid),
        )
    except grpc.aio.AioRpcError as err:
        log.warning("prefix_cache_stats_failed", address=b.address, error=_rpc_text(err))
        return None


async def _service_stats(cache: CacheService | None, rid: str) -> dict[str, Any] | None:
    if cache is None:
        return None
    try:
        replies = await asyncio.gather(*(cache.stats(ns, rid) for ns in NAMESPACES))
    except grpc.aio.AioRpcError as err:
        log.warning("cache_service_stats_failed", address=cache.address, error=_rpc_text(err))
        return None
    return {ns: cache_service_json(r) for ns, r in zip(NAMESPACES, replies, strict=True)}


async def cache_stats(request: Request) -> dict[str, Any]:
    pools: BackendPools = request.app.state.pools
    rid = request_id(request)
    replies, service = await asyncio.gather(
        asyncio.gather(*(_decoder_stats(b, rid) for b in _decoders(pools))),
        _service_stats(request.app.state.cache, rid),
    )
    return {
        "object": "cache.stats",
        "prefix_cache": prefix_cache_json([r for r in replies if r is not None]),
        "cache_service": service,
    }


async def _reset_decoder(b: Backend, pools: BackendPools, rid: str) -> int:
    try:
        reply = await b.stub.PrefixCacheReset(
            decoder_pb2.PrefixCacheResetRequest(),
            timeout=ADMIN_TIMEOUT,
            metadata=request_metadata(rid),
        )
    except grpc.aio.AioRpcError as err:
        if err.code() == grpc.StatusCode.UNIMPLEMENTED:
            return 0  # a decoder without APC has no prefix blocks to drop
        raise rpc_error(err, b, pools) from err
    return int(reply.removed_blocks)


async def _reset_service(cache: CacheService, namespaces: list[str], rid: str) -> dict[str, int]:
    try:
        counts = await asyncio.gather(*(cache.reset(ns, rid) for ns in namespaces))
    except grpc.aio.AioRpcError as err:
        text = f"cache service {cache.address}: {_rpc_text(err)}"
        unavailable = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        exc: PrismError = (
            BackendUnavailableError(text) if err.code() in unavailable else BadGatewayError(text)
        )
        raise exc from err
    return dict(zip(namespaces, counts, strict=True))


async def cache_reset(request: Request) -> dict[str, Any]:
    has_body = bool((await request.body()).strip())
    body = await parse_body(request, CacheResetBody) if has_body else CacheResetBody()
    pools: BackendPools = request.app.state.pools
    cache: CacheService | None = request.app.state.cache
    rid = request_id(request)
    decoders = _decoders(pools) if body.prefix else []
    removed = await asyncio.gather(*(_reset_decoder(b, pools, rid) for b in decoders))
    namespaces = [ns for ns, on in zip(NAMESPACES, (body.prefix, body.features), strict=True) if on]
    entries = await _reset_service(cache, namespaces, rid) if cache is not None else None
    return {
        "object": "cache.reset",
        "removed_blocks": sum(removed),
        "removed_entries": entries,  # null without a cache service; only namespaces reset
        "decoders": len(decoders),
    }
