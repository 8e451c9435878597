"""The cache engine in-process: memory LRU, disk tier, and the tiered store in front of both."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import mlx.core as mx

from services.cache import disk as disk_mod
from services.cache.disk import DiskStore, encode_header
from services.cache.store import Entry, MemoryStore
from services.cache.tiered import TieredStore


def entry(key: str, n: int = 25, namespace: str = "features", seed: int = 0) -> Entry:
    """An entry of n float32 values (4n bytes)."""
    x = mx.random.normal((n,), key=mx.random.key(seed))
    return Entry.from_arrays(key, namespace, {"features": x}, {"grid": "1,2,2"})


def file_size(e: Entry) -> int:
    return len(encode_header(e)) + e.nbytes


def same_bits(a: mx.array, b: mx.array) -> bool:
    words = {2: mx.uint16, 4: mx.uint32, 8: mx.uint64}[a.dtype.size]
    return (
        a.dtype == b.dtype and a.shape == b.shape and mx.array_equal(a.view(words), b.view(words))
    )


def test_memory_lru_order_and_byte_cap() -> None:
    mem = MemoryStore(300)  # three 100-byte entries
    for k in "abc":
        assert mem.put(entry(k))
    assert mem.get("features", "a") is not None  # a is now the most recent
    assert mem.put(entry("d"))
    assert [mem.contains("features", k) for k in "abcd"] == [True, False, True, True]
    stats = mem.stats()
    assert (stats.entries, stats.bytes, stats.capacity) == (3, 300, 300)
    assert (stats.hits, stats.evictions) == (1, 1)
    assert not mem.put(entry("huge", n=76))  # 304 bytes can never fit: refused, nothing evicted
    assert mem.stats().entries == 3


def test_disk_byte_cap_eviction_and_restart(tmp_path: Path) -> None:
    size = file_size(entry("a"))
    store = DiskStore(tmp_path, 2 * size + size // 2)  # room for two files
    for k in "ab":
        assert store.put(entry(k, seed=ord(k)))
    # Age the files explicitly: filesystem clocks are too coarse to order fast writes.
    for age, k in ((200, "a"), (100, "b")):
        t = os.stat(store.path_for("features", k)).st_mtime - age
        os.utime(store.path_for("features", k), (t, t))
    reopened = DiskStore(tmp_path, store.capacity)  # the index comes back from the directory
    assert reopened.stats().entries == 2 and reopened.stats().bytes == 2 * size
    got = reopened.get("features", "a")  # a hit touches a: b is now least recently used
    assert got is not None and got.metadata == {"grid": "1,2,2"}
    assert same_bits(got.arrays()["features"], entry("a", seed=ord("a")).arrays()["features"])
    assert DiskStore(tmp_path, store.capacity).put(entry("c"))  # a third instance, same dir
    final = DiskStore(tmp_path, store.capacity)
    assert [final.contains("features", k) for k in "abc"] == [True, False, True]
    assert len(list(tmp_path.glob("*/*.safetensors"))) == 2
    assert not final.put(entry("huge", n=1000))  # bigger than the whole tier: refused
    assert final.errors == 1  # and counted: the cap is a setting to fix


def test_bfloat16_and_float32_round_trip_bit_exact(tmp_path: Path) -> None:
    x = mx.random.normal((3, 5, 7), key=mx.random.key(1))
    specials = mx.array([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-40, 3.4e38])
    arrays = {"f32": x, "bf16": x.astype(mx.bfloat16), "special": specials, "ids": mx.arange(4)}
    tiered = TieredStore(MemoryStore(1 << 20), DiskStore(tmp_path, 1 << 20))
    assert tiered.put(Entry.from_arrays("k", "features", arrays))
    tiered.flush()
    from_memory = tiered.get("features", "k")
    from_disk = DiskStore(tmp_path, 1 << 20).get("features", "k")
    for got in (from_memory, from_disk):
        assert got is not None and list(got.tensors) == list(arrays)  # order kept
        for name, a in got.arrays().items():
            assert same_bits(a, arrays[name]), name
    # The files are ordinary safetensors: MLX reads them, metadata included.
    loaded, meta = mx.load(str(tiered.disk.path_for("features", "k")), return_metadata=True)
    assert same_bits(loaded["bf16"], arrays["bf16"]) and meta["prism.key"] == "k"


def test_unwritable_disk_is_counted_not_raised(tmp_path: Path, monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    tiered = TieredStore(MemoryStore(1 << 20), DiskStore(tmp_path, 1 << 20))
    monkeypatch.setattr(disk_mod.os, "replace", refuse)
    assert tiered.put(entry("a"))  # memory took it; the disk failure stays behind the scenes
    tiered.flush()
    assert tiered.stats().disk_errors == 1 and tiered.stats().disk.entries == 0
    assert tiered.get("features", "a") is not None
    assert not list(tmp_path.rglob("*.tmp"))  # the temp file was cleaned up


def test_read_only_directory_is_counted_not_raised(tmp_path: Path, monkeypatch) -> None:
    """A read-only filesystem (EROFS on every directory or file creation): counted, never raised.
    Simulated, because CI runs as root and root writes through read-only permissions."""

    def read_only(*_args, **_kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Path, "mkdir", read_only)
    disk = DiskStore(tmp_path / "cache", 1 << 20)  # cannot even create it
    assert disk.errors == 1 and not disk.put(entry("a")) and disk.errors == 2
    disk = DiskStore(tmp_path, 1 << 20)  # exists, but nothing can be created in it
    assert not disk.put(entry("a")) and disk.errors == 2  # the scan's mkdir, then the write
    monkeypatch.setattr(Path, "open", read_only)
    assert not disk.put(entry("b")) and disk.errors == 3
    assert disk.get("features", "a") is None


def test_corrupt_files_are_skipped_and_deleted(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, 1 << 20)
    for k in "abc":
        assert store.put(entry(k))
    truncated, flipped = store.path_for("features", "a"), store.path_for("features", "b")
    truncated.write_bytes(truncated.read_bytes()[:-3])
    data = bytearray(flipped.read_bytes())
    data[-1] ^= 0xFF  # same size, valid header: only the checksum can tell
    flipped.write_bytes(bytes(data))
    (truncated.parent / "leftover.safetensors.1234.tmp").write_bytes(b"half a write")
    reopened = DiskStore(tmp_path, 1 << 20)
    assert not truncated.exists() and not reopened.contains("features", "a")
    assert reopened.get("features", "b") is None and not flipped.exists()
    assert reopened.get("features", "c") is not None
    assert reopened.errors == 2 and not list(tmp_path.rglob("*.tmp"))


def test_disk_hit_is_promoted_and_puts_do_not_wait_for_disk(tmp_path: Path, monkeypatch) -> None:
    memory = MemoryStore(100)  # one entry
    tiered = TieredStore(memory, DiskStore(tmp_path, 1 << 20), max_pending_bytes=1 << 20)
    release = threading.Event()
    real_put = tiered.disk.put
    monkeypatch.setattr(tiered.disk, "put", lambda e: release.wait(30) and real_put(e))
    assert tiered.put(entry("a")) and tiered.put(entry("b"))  # returns with the writer blocked
    assert tiered.contains("features", ["a", "b"]) == [True, True]  # a: pending, not lost
    assert tiered.get("features", "a") is not None
    release.set()
    tiered.flush()
    assert tiered.stats().disk.entries == 2
    assert tiered.put(entry("c"))  # pushes a and b out of memory
    hits = tiered.stats().disk.hits
    assert tiered.get("features", "b") is not None and tiered.stats().disk.hits == hits + 1
    assert tiered.memory.contains("features", "b")  # promoted
    assert tiered.get("features", "zzz") is None and tiered.stats().misses == 1


def test_reset_and_stats_per_namespace(tmp_path: Path) -> None:
    tiered = TieredStore(MemoryStore(1 << 20), DiskStore(tmp_path, 1 << 20))
    tiered.put(entry("f1"))
    tiered.put(entry("f2"))
    tiered.put(entry("k1", namespace="kv"))
    tiered.flush()
    assert tiered.stats("kv").memory.entries == 1 and tiered.stats().memory.entries == 3
    assert tiered.stats("kv").puts == 1 and tiered.stats().puts == 3
    assert tiered.reset("kv") == 1  # in both tiers, counted once
    assert tiered.contains("kv", ["k1"]) == [False]
    assert tiered.contains("features", ["f1", "f2"]) == [True, True]
    assert DiskStore(tmp_path, 1 << 20).stats().entries == 2  # gone from disk for good
    assert tiered.reset() == 2 and tiered.stats().disk.entries == 0
