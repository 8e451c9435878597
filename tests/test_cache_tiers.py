"""Cache tiers under issue #5's requirements: corrupt shards are never served, the disk cap holds
under a fill workload, per-namespace memory caps, APC_* environment names, Contains as a hit."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import mlx.core as mx
import pytest

from services.cache.__main__ import MIB, build_store, parse_args
from services.cache.disk import DiskStore, encode_header
from services.cache.store import Entry, MemoryStore
from services.cache.tiered import TieredStore


def entry(key: str, n: int = 25, namespace: str = "features", seed: int = 0) -> Entry:
    """An entry of n float32 values (4n bytes)."""
    x = mx.random.normal((n,), key=mx.random.key(seed))
    return Entry.from_arrays(key, namespace, {"features": x}, {"grid": "1,2,2"})


def data_start(path: Path) -> int:
    return 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01  # one bit: the smallest damage there is
    path.write_bytes(bytes(data))


def disk_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


# ---- corruption ---------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_flipped_data_byte_is_a_miss_the_file_goes_and_is_counted(tmp_path: Path, where) -> None:
    first = TieredStore(MemoryStore(1 << 20), DiskStore(tmp_path, 1 << 20))
    assert first.put(entry("a", n=1000))
    first.flush()
    path = first.disk.path_for("features", "a")
    start, size = data_start(path), path.stat().st_size
    flip(path, {"first": start, "middle": (start + size) // 2, "last": size - 1}[where])
    # A fresh memory tier, so the read has to come from the damaged file.
    tiered = TieredStore(MemoryStore(1 << 20), DiskStore(tmp_path, 1 << 20))
    assert tiered.stats().disk.entries == 1  # same size, valid header: the scan cannot tell
    assert tiered.get("features", "a") is None
    stats = tiered.stats()
    assert not path.exists() and stats.disk.entries == 0
    assert (stats.disk_errors, stats.misses, stats.disk.hits) == (1, 1, 0)
    assert tiered.put(entry("a", n=1000))  # the caller recomputes and stores it again
    tiered.flush()
    assert DiskStore(tmp_path, 1 << 20).get("features", "a") is not None


def test_header_damage_that_still_parses_is_caught(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, 1 << 20)
    assert store.put(entry("a"))
    path = store.path_for("features", "a")
    raw = path.read_bytes()
    at = raw.index(b"1,2,2")  # the metadata value: the JSON stays valid, the sizes too
    path.write_bytes(raw[:at] + b"1,2,3" + raw[at + 5 :])
    assert store.get("features", "a") is None and not path.exists() and store.errors == 1


def test_truncated_file_is_dropped_while_running_and_at_restart(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, 1 << 20)
    for k in "abc":
        assert store.put(entry(k, seed=ord(k)))
    a, b = store.path_for("features", "a"), store.path_for("features", "b")
    a.write_bytes(a.read_bytes()[:-1])  # under a running store: caught on read
    assert store.get("features", "a") is None and not a.exists() and store.errors == 1
    b.write_bytes(b.read_bytes()[: data_start(b) + 10])  # before a restart: caught by the scan
    reopened = DiskStore(tmp_path, 1 << 20)
    assert not b.exists() and not reopened.contains("features", "b") and reopened.errors == 1
    got = reopened.get("features", "c")
    assert got is not None and mx.array_equal(
        got.arrays()["features"], entry("c", seed=ord("c")).arrays()["features"]
    )
    assert reopened.stats().entries == 1 and reopened.errors == 1


def test_restart_serves_good_files_and_drops_bad_ones(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, 1 << 20)
    for k in "abcd":
        assert store.put(entry(k, seed=ord(k)))
    paths = {k: store.path_for("features", k) for k in "abcd"}
    flip(paths["a"], paths["a"].stat().st_size - 7)  # data
    flip(paths["b"], 3)  # the length prefix
    paths["c"].write_bytes(paths["c"].read_bytes()[:5])  # not even a length prefix left
    reopened = DiskStore(tmp_path, 1 << 20)
    assert reopened.errors == 2 and not paths["b"].exists() and not paths["c"].exists()
    assert reopened.get("features", "a") is None and not paths["a"].exists()
    assert reopened.get("features", "d") is not None
    assert reopened.errors == 3 and reopened.stats().entries == 1


def test_files_of_the_crc32_format_are_dropped(tmp_path: Path) -> None:
    e = entry("a")
    header = json.loads(encode_header(e)[8:])
    meta = header["__metadata__"]
    meta["prism.crc32"] = "0"
    del meta["prism.xxh3_128"]
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    store = DiskStore(tmp_path, 1 << 20)
    path = store.path_for("features", "a")
    path.parent.mkdir(parents=True)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + e.tensors["features"].data)
    reopened = DiskStore(tmp_path, 1 << 20)
    assert not path.exists() and reopened.errors == 1 and reopened.stats().entries == 0


# ---- the disk cap under a fill workload ---------------------------------------------------


def test_disk_cap_holds_under_fill_and_survivors_outlive_a_restart(tmp_path: Path) -> None:
    size = len(encode_header(entry("k00", n=256))) + 1024  # every key has the same length
    cap, kept, total = 10 * size + size // 2, 10, 40
    memory = MemoryStore(3 * 1024)  # memory holds only a few: the disk tier does the work
    tiered = TieredStore(memory, DiskStore(tmp_path, cap), max_pending_bytes=1 << 20)
    keys = [f"k{i:02d}" for i in range(total)]
    for batch in range(0, total, 5):
        for k in keys[batch : batch + 5]:
            assert tiered.put(entry(k, n=256, seed=int(k[1:])))
        tiered.flush()
        assert disk_bytes(tmp_path) <= cap and tiered.stats().disk.bytes <= cap
    stats = tiered.stats()
    assert (stats.disk.entries, stats.disk.evictions, stats.disk_errors) == (
        kept,
        total - kept,
        0,
    )
    assert len(list(tmp_path.rglob("*.safetensors"))) == kept
    tiered.close()

    restarted = TieredStore(MemoryStore(1 << 20), DiskStore(tmp_path, cap))
    survivors = keys[-kept:]  # LRU: the last written are the ones left
    for k in keys:
        got = restarted.get("features", k)
        assert (got is not None) == (k in survivors), k
    stats = restarted.stats()
    assert (stats.disk.hits, stats.misses) == (kept, total - kept)


# ---- per-namespace memory caps ------------------------------------------------------------


def test_namespace_cap_evicts_only_within_the_namespace() -> None:
    mem = MemoryStore(1000, {"kv": 300, "features": 0})  # 100-byte entries
    for i in range(3):
        assert mem.put(entry(f"f{i}"))
    for i in range(5):
        assert mem.put(entry(f"k{i}", namespace="kv"))
    kv, features = mem.stats("kv"), mem.stats("features")
    assert (kv.entries, kv.bytes, kv.evictions, kv.capacity) == (3, 300, 2, 300)
    assert (features.entries, features.evictions, features.capacity) == (3, 0, 1000)
    assert mem.get("kv", "k2") is not None  # used: k3 is now the oldest kv block
    assert mem.put(entry("k5", namespace="kv"))
    present = [mem.contains("kv", f"k{i}") for i in range(6)]
    assert present == [False, False, True, False, True, True]
    assert not mem.put(entry("big", n=100, namespace="kv"))  # 400 bytes: over the kv cap
    assert mem.put(entry("big", n=100))  # fine as a feature
    assert mem.stats("kv").entries == 3 and mem.stats().evictions == 3


def test_global_cap_still_applies_across_namespaces() -> None:
    mem = MemoryStore(500, {"features": 300})
    for i in range(3):
        assert mem.put(entry(f"k{i}", namespace="kv"))
    for i in range(3):
        assert mem.put(entry(f"f{i}"))  # total 600 > 500: the oldest of all (k0) goes
    assert mem.stats().bytes == 500 and not mem.contains("kv", "k0")
    assert mem.stats("kv").evictions == 1 and mem.stats("features").evictions == 0


# ---- Contains is a lookup -----------------------------------------------------------------


def test_contains_counts_hits_and_misses_and_keeps_entries_alive(tmp_path: Path) -> None:
    tiered = TieredStore(MemoryStore(300))  # three entries
    for k in "abc":
        tiered.put(entry(k))
    assert tiered.contains("features", ["a", "zzz"]) == [True, False]
    tiered.put(entry("d"))  # b, not a, was the least recently used
    assert tiered.contains("features", ["a", "b"]) == [True, False]
    stats = tiered.stats("features")
    assert (stats.memory.hits, stats.misses) == (2, 2)

    size = len(encode_header(entry("a"))) + 100
    disk = DiskStore(tmp_path, 2 * size)
    assert disk.put(entry("a")) and disk.put(entry("b"))
    on_disk = TieredStore(MemoryStore(1 << 20), DiskStore(tmp_path, 2 * size))
    assert on_disk.contains("features", ["a"]) == [True]
    assert on_disk.stats().disk.hits == 1 and not on_disk.memory.contains("features", "a")
    assert on_disk.disk.put(entry("c"))  # a was used: b is evicted
    assert [on_disk.disk.contains("features", k) for k in "abc"] == [True, False, True]


# ---- flags ---------------------------------------------------------------------------------

ENV = [
    "PRISM_CACHE_DISK_PATH",
    "PRISM_CACHE_DISK_MAX_GB",
    "APC_DISK_PATH",
    "APC_DISK_MAX_GB",
    "PRISM_VISION_CACHE_SIZE",
    "PRISM_PREFIX_CACHE_MEMORY_MB",
    "PRISM_CACHE_MEMORY_MB",
]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_flag_defaults(clean_env) -> None:
    args = parse_args([])
    assert (args.disk_path, args.disk_max_gb, args.memory_mb) == ("", 10, 1024)
    assert (args.vision_cache_size, args.prefix_cache_memory_mb) == (0, 0)
    store = build_store(args)
    assert store.disk is None and store.memory.namespace_caps == {}


def test_apc_disk_names_are_fallbacks(clean_env, tmp_path: Path) -> None:
    clean_env.setenv("APC_DISK_PATH", str(tmp_path / "apc"))
    clean_env.setenv("APC_DISK_MAX_GB", "2.5")
    args = parse_args([])
    assert (args.disk_path, args.disk_max_gb) == (str(tmp_path / "apc"), 2.5)
    clean_env.setenv("PRISM_CACHE_DISK_PATH", str(tmp_path / "prism"))
    clean_env.setenv("PRISM_CACHE_DISK_MAX_GB", "3")
    args = parse_args([])
    assert (args.disk_path, args.disk_max_gb) == (str(tmp_path / "prism"), 3)
    args = parse_args(["--disk-path", str(tmp_path / "flag"), "--disk-max-gb", "1"])
    assert (args.disk_path, args.disk_max_gb) == (str(tmp_path / "flag"), 1)
    assert build_store(args).disk.capacity == 1 << 30


def test_namespace_cap_flags_and_env(clean_env) -> None:
    clean_env.setenv("PRISM_VISION_CACHE_SIZE", "64")
    clean_env.setenv("PRISM_PREFIX_CACHE_MEMORY_MB", "32")
    args = parse_args(["--memory-mb", "128"])
    assert build_store(args).memory.namespace_caps == {"features": 64 * MIB, "kv": 32 * MIB}
    args = parse_args(["--prefix-cache-memory-mb", "0.5", "--vision-cache-size", "0"])
    assert build_store(args).memory.namespace_caps == {"kv": MIB // 2}
    with pytest.raises(SystemExit):
        parse_args(["--prefix-cache-memory-mb", "-1"])
