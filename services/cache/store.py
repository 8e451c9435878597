"""The cache's entries and its memory tier: an LRU of raw tensor bytes under a byte cap.

Entries keep tensors as raw little-endian bytes plus (dtype, shape) rather than `mx.array`s:
they arrive as bytes, leave as bytes and go to disk as bytes, so the cache never converts.
`MemoryStore._evict_locked` is the one place that decides what leaves: the least recently used
entries, first of a namespace over its own cap (so prefix KV blocks cannot push every vision
feature out), then of any namespace while the total is over the global cap.
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field

import mlx.core as mx

from shared.errors import PrismError
from shared.rpc import tensors as wire

# Element sizes of the dtypes the cache accepts (names as `shared.rpc.tensors.dtype_name`).
DTYPE_SIZES: dict[str, int] = {
    "bool": 1,
    "uint8": 1,
    "uint16": 2,
    "uint32": 4,
    "uint64": 8,
    "int8": 1,
    "int16": 2,
    "int32": 4,
    "int64": 8,
    "float16": 2,
    "bfloat16": 2,
    "float32": 4,
    "float64": 8,
    "complex64": 8,
}

EntryId = tuple[str, str]  # (namespace, key)


class EntryNotFoundError(PrismError):
    grpc_code = "NOT_FOUND"
    http_status = 404
    error_type = "invalid_request_error"


def tensor_nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    n = DTYPE_SIZES[dtype]
    for s in shape:
        n *= s
    return n


@dataclass(frozen=True)
class TensorData:
    """One tensor as stored: C-contiguous little-endian bytes (bfloat16 as raw 16-bit words)."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes

    def to_array(self) -> mx.array:
        return wire.from_bytes(self.data, self.dtype, self.shape)


@dataclass
class Entry:
    key: str
    namespace: str
    tensors: dict[str, TensorData]  # insertion order is the wire order
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def id(self) -> EntryId:
        return (self.namespace, self.key)

    @property
    def nbytes(self) -> int:
        return sum(len(t.data) for t in self.tensors.values())

    @classmethod
    def from_arrays(
        cls,
        key: str,
        namespace: str,
        arrays: dict[str, mx.array],
        metadata: dict[str, str] | None = None,
    ) -> Entry:
        tensors = {
            name: TensorData(wire.dtype_name(a), tuple(a.shape), wire.to_bytes(a))
            for name, a in arrays.items()
        }
        return cls(key, namespace, tensors, dict(metadata or {}))

    def arrays(self) -> dict[str, mx.array]:
        return {name: t.to_array() for name, t in self.tensors.items()}


@dataclass
class TierStats:
    entries: int = 0
    bytes: int = 0
    capacity: int = 0
    hits: int = 0
    evictions: int = 0


@dataclass
class CacheStats:
    memory: TierStats
    disk: TierStats
    misses: int = 0
    puts: int = 0
    disk_errors: int = 0


class MemoryStore:
    """Thread-safe LRU keyed by (namespace, key); `capacity` caps the tensor bytes held, and
    `namespace_caps` optionally caps single namespaces below that (0 or absent: no own cap)."""

    def __init__(
        self, capacity_bytes: int, namespace_caps: Mapping[str, int] | None = None
    ) -> None:
        self.capacity = capacity_bytes
        self.namespace_caps = {ns: cap for ns, cap in (namespace_caps or {}).items() if cap > 0}
        self._entries: OrderedDict[EntryId, Entry] = OrderedDict()
        self._bytes = 0
        self._ns_bytes: Counter[str] = Counter()
        self._hits: Counter[str] = Counter()
        self._evictions: Counter[str] = Counter()
        self._lock = threading.Lock()

    def capacity_for(self, namespace: str) -> int:
        """The most bytes `namespace` may hold (the global cap when it has no own cap)."""
        return min(self.capacity, self.namespace_caps.get(namespace, self.capacity))

    def get(self, namespace: str, key: str) -> Entry | None:
        with self._lock:
            entry = self._entries.get((namespace, key))
            if entry is not None:
                self._entries.move_to_end(entry.id)
                self._hits[namespace] += 1
            return entry

    def contains(self, namespace: str, key: str) -> bool:
        # A membership probe is not a use: it must not keep an entry alive.
        with self._lock:
            return (namespace, key) in self._entries

    def count_hit(self, namespace: str) -> None:
        """A hit served from memory outside the LRU (an entry still queued for its disk write)."""
        with self._lock:
            self._hits[namespace] += 1

    def put(self, entry: Entry) -> bool:
        """Insert or replace; evicts least recently used entries. False if it can never fit."""
        size = entry.nbytes
        if size > self.capacity_for(entry.namespace):
            return False
        with self._lock:
            self._remove_locked(entry.id)
            self._evict_locked(entry.namespace, size)
            self._entries[entry.id] = entry
            self._bytes += size
            self._ns_bytes[entry.namespace] += size
        return True

    def _evict_locked(self, namespace: str, incoming: int) -> None:
        """Make room for `incoming` bytes of `namespace`, least recently used first."""
        excess = self._ns_bytes[namespace] + incoming - self.capacity_for(namespace)
        if excess > 0 and namespace in self.namespace_caps:
            victims = []
            for entry_id, entry in self._entries.items():  # oldest first; others stay
                if excess <= 0:
                    break
                if entry_id[0] == namespace:
                    victims.append(entry_id)
                    excess -= entry.nbytes
            for entry_id in victims:
                self._remove_locked(entry_id)
                self._evictions[namespace] += 1
        while self._bytes + incoming > self.capacity and self._entries:
            entry_id = next(iter(self._entries))
            self._remove_locked(entry_id)
            self._evictions[entry_id[0]] += 1

    def _remove_locked(self, entry_id: EntryId) -> bool:
        old = self._entries.pop(entry_id, None)
        if old is not None:
            self._bytes -= old.nbytes
            self._ns_bytes[entry_id[0]] -= old.nbytes
        return old is not None

    def delete(self, namespace: str, key: str) -> bool:
        with self._lock:
            return self._remove_locked((namespace, key))

    def reset(self, namespace: str = "") -> set[EntryId]:
        """Drop every entry of `namespace` (all when empty); returns the ids removed."""
        with self._lock:
            ids = {i for i in self._entries if not namespace or i[0] == namespace}
            for entry_id in ids:
                self._remove_locked(entry_id)
            return ids

    def stats(self, namespace: str = "") -> TierStats:
        with self._lock:
            chosen = [e for i, e in self._entries.items() if not namespace or i[0] == namespace]
            return TierStats(
                entries=len(chosen),
                bytes=sum(e.nbytes for e in chosen),
                capacity=self.capacity_for(namespace) if namespace else self.capacity,
                hits=count_for(self._hits, namespace),
                evictions=count_for(self._evictions, namespace),
            )


def count_for(counter: Counter[str], namespace: str) -> int:
    return counter[namespace] if namespace else sum(counter.values())
