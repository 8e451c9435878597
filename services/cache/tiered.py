"""Memory in front of disk: reads try memory, then disk (a disk hit is promoted to memory);
writes land in memory and reach disk on one background thread, off the request path.

Entries waiting for their disk write stay readable from `_pending` even if memory evicts them
first, so a Put is visible to every later Get/Contains from the moment it returns.
"""

from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import structlog

from services.cache.disk import DiskStore
from services.cache.store import CacheStats, Entry, EntryId, MemoryStore, TierStats, count_for

log = structlog.get_logger("cache")


class TieredStore:
    """The cache engine the servicer wraps. Thread-safe; blocking calls (disk reads, oversize
    puts) are meant to run off the event loop (`asyncio.to_thread`)."""

    def __init__(
        self,
        memory: MemoryStore,
        disk: DiskStore | None = None,
        *,
        max_pending_bytes: int | None = None,
    ) -> None:
        self.memory = memory
        self.disk = disk
        # Bounds what unwritten entries may hold when the disk is slower than the puts.
        self.max_pending_bytes = memory.capacity if max_pending_bytes is None else max_pending_bytes
        self._pending: dict[EntryId, Entry] = {}
        self._pending_bytes = 0
        self._skipped = 0  # disk writes dropped because the backlog was full
        self._misses: Counter[str] = Counter()
        self._puts: Counter[str] = Counter()
        self._lock = threading.Lock()
        # One writer: disk writes are sequential anyway, and FIFO order makes `flush` trivial.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-disk")

    def put(self, entry: Entry) -> bool:
        """Store an entry; True if some tier holds it. Returns before the disk write, except for
        an entry too big for memory, whose only home is the disk (the caller needs the answer)."""
        with self._lock:
            self._puts[entry.namespace] += 1
        in_memory = self.memory.put(entry)
        if self.disk is None:
            return in_memory
        if not in_memory:
            return self.disk.put(entry)
        if self.disk.contains(*entry.id):
            return True  # content-addressed: the same key already holds the same bytes
        with self._lock:
            old = self._pending.get(entry.id)
            backlog = self._pending_bytes - (old.nbytes if old else 0) + entry.nbytes
            if backlog > self.max_pending_bytes:
                self._skipped += 1
                log.warning("disk_write_skipped", key=entry.key, pending_bytes=backlog)
                return True
            self._pending[entry.id] = entry
            self._pending_bytes = backlog
        self._writer.submit(self._write_behind, entry)
        return True

    def _write_behind(self, entry: Entry) -> None:
        assert self.disk is not None
        with self._lock:
            if self._pending.get(entry.id) is not entry:
                return  # reset meanwhile, or a newer put of the key is queued behind us
        try:
            self.disk.put(entry)  # failures are counted and logged by the disk tier
        except Exception:  # noqa: BLE001 - the writer thread must survive anything
            log.exception("disk_write_crashed", key=entry.key)
        with self._lock:
            current = self._pending.get(entry.id)
            if current is entry:
                del self._pending[entry.id]
                self._pending_bytes -= entry.nbytes
        if current is None:  # the namespace was reset while we wrote: undo the write
            self.disk.delete(*entry.id)

    def get(self, namespace: str, key: str) -> Entry | None:
        entry = self.memory.get(namespace, key)
        if entry is not None:
            return entry
        with self._lock:
            entry = self._pending.get((namespace, key))
        if entry is not None:
            self.memory.count_hit(namespace)  # still in this process's memory, awaiting disk
        elif self.disk is not None:
            entry = self.disk.get(namespace, key)
        if entry is None:
            with self._lock:
                self._misses[namespace] += 1
            return None
        self.memory.put(entry)  # promote: the next read is a memory hit
        return entry

    def contains(self, namespace: str, keys: list[str]) -> list[bool]:
        """Presence of each key. A lookup like `get` minus the transfer: present counts a hit of
        the tier holding it and refreshes its LRU position, absent counts a miss."""
        return [self._contains(namespace, k) for k in keys]

    def _contains(self, namespace: str, key: str) -> bool:
        if self.memory.get(namespace, key) is not None:
            return True
        with self._lock:
            pending = (namespace, key) in self._pending
        if pending:
            self.memory.count_hit(namespace)
            return True
        if self.disk is not None and self.disk.use(namespace, key):
            return True
        with self._lock:
            self._misses[namespace] += 1
        return False

    def reset(self, namespace: str = "") -> int:
        """Remove every entry of `namespace` (all when empty) from both tiers; returns how many
        distinct entries went."""
        removed = self.memory.reset(namespace)
        with self._lock:
            for entry_id in [i for i in self._pending if not namespace or i[0] == namespace]:
                self._pending_bytes -= self._pending.pop(entry_id).nbytes
                removed.add(entry_id)
        if self.disk is not None:
            removed |= self.disk.reset(namespace)
        log.info("cache_reset", namespace=namespace or "*", removed=len(removed))
        return len(removed)

    def stats(self, namespace: str = "") -> CacheStats:
        disk = self.disk.stats(namespace) if self.disk is not None else TierStats()
        with self._lock:
            return CacheStats(
                memory=self.memory.stats(namespace),
                disk=disk,
                misses=count_for(self._misses, namespace),
                puts=count_for(self._puts, namespace),
                disk_errors=(self.disk.errors if self.disk else 0) + self._skipped,
            )

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every disk write queued so far has landed (FIFO single writer)."""
        self._writer.submit(lambda: None).result(timeout)

    def close(self) -> None:
        self._writer.shutdown(wait=True)
