"""The decoder's memory tier of prefix blocks: an LRU under a byte cap, with reference counts.

A block is one `mx.array` (layers, 2, n_kv_heads, block_size, head_dim) holding the keys and
values of one block of a prompt. A request that matches blocks holds a reference on each until
its prefill is done; eviction (least recently used first) never picks a referenced block, so a
block is never dropped while a request still counts on it. Shared by the engine thread (match,
put, release) and the event loop (remote preload, stats), hence the lock.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import mlx.core as mx


@dataclass
class Block:
    key: str
    kv: mx.array
    refs: int = 0
    remote: bool = False  # fetched from the cache service, not matched by any request yet

    @property
    def nbytes(self) -> int:
        return self.kv.nbytes


@dataclass
class PoolCounters:
    memory_hits: int = 0  # leading blocks matched from memory
    remote_hits: int = 0  # ... of which had just been fetched from the cache service
    misses: int = 0  # whole prompt blocks not matched
    evictions: int = 0
    hits: int = 0  # blocks handed out by `match`


class BlockPool:
    def __init__(self, capacity_bytes: int) -> None:
        self.capacity = capacity_bytes
        self.nbytes = 0
        self.pinned = 0  # bytes of blocks some request holds a reference on
        self.counters = PoolCounters()
        self._blocks: OrderedDict[str, Block] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, key: str) -> bool:
        return key in self._blocks

    def leading(self, keys: list[str]) -> int:
        """How many of `keys`, from the first, are held (no reference taken)."""
        with self._lock:
            n = 0
            while n < len(keys) and keys[n] in self._blocks:
                n += 1
            return n

    def match(self, keys: list[str]) -> list[Block]:
        """The longest run of leading `keys` held, each with a reference taken."""
        out: list[Block] = []
        with self._lock:
            for key in keys:
                block = self._blocks.get(key)
                if block is None:
                    break
                if block.refs == 0:
                    self.pinned += block.nbytes
                block.refs += 1
                out.append(block)
            for block in reversed(out):  # the chain's head becomes the most recent
                self._blocks.move_to_end(block.key)
            remote = sum(b.remote for b in out)
            for block in out:
                block.remote = False
            c = self.counters
            c.remote_hits += remote
            c.memory_hits += len(out) - remote
            c.hits += len(out)
            c.misses += len(keys) - len(out)
        return out

    def touch(self, keys: list[str]) -> None:
        """Mark the held `keys` used, in order (the last one becomes the most recent)."""
        with self._lock:
            for key in keys:
                if key in self._blocks:
                    self._blocks.move_to_end(key)

    def release(self, blocks: list[Block]) -> None:
        with self._lock:
            for block in blocks:
                block.refs -= 1
                if block.refs == 0 and self._blocks.get(block.key) is block:
                    self.pinned -= block.nbytes

    def put(self, key: str, kv: mx.array, *, remote: bool = False) -> bool:
        """Hold a block (False if it cannot fit without evicting blocks in use)."""
        with self._lock:
            if key in self._blocks:
                self._blocks.move_to_end(key)
                return True
            if not self._evict_locked(kv.nbytes):
                return False
            self._blocks[key] = Block(key, kv, remote=remote)
            self.nbytes += kv.nbytes
            return True

    def reset(self) -> int:
        """Drop every block no request holds; returns how many went."""
        with self._lock:
            free = [k for k, b in self._blocks.items() if b.refs == 0]
            for key in free:
                self.nbytes -= self._blocks.pop(key).nbytes
            return len(free)

    def _evict_locked(self, incoming: int) -> bool:
        """Evict unreferenced blocks, oldest first, until `incoming` more bytes fit."""
        if self.nbytes + incoming <= self.capacity:
            return True
        if self.pinned + incoming > self.capacity:
            return False  # evicting every free block would not make room
        victims = []
        for key, block in self._blocks.items():  # oldest first
            if block.refs == 0:
                victims.append(key)
                self.nbytes -= block.nbytes
                if self.nbytes + incoming <= self.capacity:
                    break
        for key in victims:
            del self._blocks[key]
        self.counters.evictions += len(victims)
        return True
