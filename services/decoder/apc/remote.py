"""The cache service as the prefix cache's second tier (namespace "kv"), on the event loop.

Before a request is submitted, `preload` fetches the blocks that follow the memory tier's
leading run, as long as the cache service holds them in order, and puts them in the pool; the
engine's admission then matches them like any other block. New blocks from the engine thread
arrive through `submit` and are written behind the request path by one writer task; a full
backlog drops writes (counted) rather than holding memory. Failures of the cache service never
fail a request: the prefix is simply recomputed. Every failed call is counted (`errors`); an
outage is logged once when it starts (`apc_remote_unavailable`, warning) and once when a call
succeeds again (`apc_remote_recovered`, with how many calls failed meanwhile), the calls in
between at debug only: a dead cache would otherwise log one warning per block of every prompt.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

import mlx.core as mx
import structlog

from services.decoder.apc.prefix import NewBlocks, PrefixCache
from shared.errors import PrismError

log = structlog.get_logger("decoder")

NAMESPACE = "kv"
MAX_BACKLOG = 1024  # blocks waiting for their write
WINDOW = 16  # blocks fetched concurrently; a new prompt costs one window of misses


class BlockStore(Protocol):
    """The part of `services.cache.client.CacheClient` used here."""

    async def put(
        self, key: str, tensors: dict[str, mx.array], *, namespace: str = ...,
        metadata: dict[str, str] | None = ..., request_id: str = ...,
    ) -> bool: ...  # fmt: skip

    async def get(
        self, key: str, *, namespace: str = ..., request_id: str = ...
    ) -> dict[str, mx.array] | None: ...


class RemoteTier:
    def __init__(self, prefix: PrefixCache, store: BlockStore) -> None:
        self.prefix, self.store = prefix, store
        self.dropped = 0  # writes skipped because the backlog was full
        self.errors = 0  # failed reads and writes, ever
        self._outage_errors: int | None = None  # errors when the current outage began; None: up
        self._queue: asyncio.Queue[tuple[str, mx.array]] = asyncio.Queue(MAX_BACKLOG)
        self._loop = asyncio.get_running_loop()
        self._writer = asyncio.create_task(self._write_loop())
        prefix.sink = self.submit

    async def preload(self, keys: list[str], prompt_len: int, request_id: str = "") -> int:
        """Fetch the usable blocks missing from memory, in windows of concurrent Gets, up to
        the first the cache service lacks; returns how many were loaded."""
        usable = self.prefix.usable(keys, prompt_len)
        rest = usable[self.prefix.pool.leading(usable) :]
        loaded = 0
        for start in range(0, len(rest), WINDOW):
            window = rest[start : start + WINDOW]
            try:
                entries = await asyncio.gather(
                    *(self.store.get(k, namespace=NAMESPACE, request_id=request_id) for k in window)
                )
            except PrismError as exc:
                self._failed("read", exc)
                return loaded
            self._succeeded()
            for key, entry in zip(window, entries, strict=True):
                kv = (entry or {}).get("kv")
                if kv is None or (tuple(kv.shape), kv.dtype) != self.prefix.block_layout:
                    return loaded  # absent, or not a block of this model: the chain ends here
                mx.eval(kv)  # lazy arrays cannot cross to the engine thread
                if not self.prefix.pool.put(key, kv, remote=True):
                    return loaded
                loaded += 1
        return loaded

    def submit(self, blocks: NewBlocks) -> None:
        """From the engine thread: queue new blocks for writing."""
        self._loop.call_soon_threadsafe(self._enqueue, blocks)

    def _enqueue(self, blocks: NewBlocks) -> None:
        for item in blocks:
            try:
                self._queue.put_nowait(item)
            except asyncio.QueueFull:
                self.dropped += 1

    async def _write_loop(self) -> None:
        meta = {"block_size": str(self.prefix.block_size), "model": self.prefix.model_id[:16]}
        while True:
            key, kv = await self._queue.get()
            try:
                await self.store.put(key, {"kv": kv}, namespace=NAMESPACE, metadata=meta)
            except PrismError as exc:
                self._failed("write", exc, key=key[:16])
            else:
                self._succeeded()
            finally:
                self._queue.task_done()

    def _failed(self, op: str, exc: PrismError, **fields: str) -> None:
        self.errors += 1
        if self._outage_errors is None:  # the first failure of an outage: say so once
            self._outage_errors = self.errors - 1
            log.warning(
                "apc_remote_unavailable", op=op, error=str(exc), errors=self.errors, **fields
            )
        else:
            log.debug(f"apc_remote_{op}_failed", error=str(exc), errors=self.errors, **fields)

    def _succeeded(self) -> None:
        if self._outage_errors is not None:
            failed = self.errors - self._outage_errors
            self._outage_errors = None
            log.info("apc_remote_recovered", failed_calls=failed, errors=self.errors)

    def discard(self) -> int:
        """Drop the queued writes (a reset: what was reset must not come back); returns how
        many. A write already under way may still land."""
        dropped = 0
        while not self._queue.empty():
            self._queue.get_nowait()
            self._queue.task_done()
            dropped += 1
        return dropped

    async def drain(self) -> None:
        """Wait until every queued write was attempted (tests, shutdown)."""
        await self._queue.join()

    async def close(self) -> None:
        self.prefix.sink = None
        self._writer.cancel()
