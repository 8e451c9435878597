"""Prefix-cache building blocks: chained block keys and the reference-counted LRU block pool."""

from __future__ import annotations

import hashlib

import mlx.core as mx
import pytest
import xxhash

from services.decoder.apc.hashing import MediaSpan, block_keys, media_spans, root_key
from services.decoder.apc.pool import BlockPool

BS = 4
TOKENS = list(range(100, 118))  # 4 whole blocks and 2 tokens left over


def keys(tokens=TOKENS, media=(), tenant="", hash_name="xxhash") -> list[str]:
    return block_keys(tokens, media, root_key("m", BS, tenant, hash_name), BS, hash_name)


def test_one_key_per_whole_block_and_each_chains_its_parent() -> None:
    base = keys()
    assert len(base) == 4 and len(set(base)) == 4
    changed = keys(TOKENS[:9] + [0] + TOKENS[10:])  # a token of block 2
    assert changed[:2] == base[:2]
    assert all(a != b for a, b in zip(changed[2:], base[2:], strict=True))
    assert keys(TOKENS[:8]) == base[:2]  # a prefix's keys are the longer prompt's first keys


def test_the_key_is_the_documented_digest() -> None:
    """Length-prefixed fields: parent key, the block's int32 tokens, overlapping media keys."""

    def field(d, data: bytes) -> None:
        d.update(len(data).to_bytes(8, "little") + data)

    root = root_key("m", BS, "", "sha256")
    d = hashlib.sha256()
    field(d, root.encode())
    field(d, b"".join(t.to_bytes(4, "little") for t in TOKENS[:4]))
    field(d, b"img")
    got = block_keys(TOKENS, [MediaSpan(2, 6, "img")], root, BS, "sha256")
    assert got[0] == d.hexdigest()
    d = xxhash.xxh3_128()
    for part in (b"prism-apc-v1", b"m", b"4", b"t"):
        field(d, part)
    assert root_key("m", BS, "t", "xxhash") == d.hexdigest()


def test_media_keys_change_only_the_blocks_their_placeholders_touch_and_later() -> None:
    a = keys(media=[MediaSpan(5, 9, "image-a")])
    b = keys(media=[MediaSpan(5, 9, "image-b")])
    assert a[0] == b[0] == keys()[0]  # block 0 (tokens 0-3) holds no placeholder
    assert all(x != y for x, y in zip(a[1:], b[1:], strict=True))


def test_tenant_model_and_hash_each_give_disjoint_keys() -> None:
    base = set(keys())
    for other in (keys(tenant="t"), keys(hash_name="sha256")):
        assert not base & set(other)
    other_model = block_keys(TOKENS, [], root_key("m2", BS, "", "xxhash"), BS)
    assert not base & set(other_model)
    with pytest.raises(ValueError, match="unknown APC hash"):
        keys(hash_name="md5")


def test_media_spans_take_placeholders_in_order() -> None:
    ids = [1, 9, 9, 2, 8, 8, 8, 3]
    spans = media_spans(ids, [8, 9], [("a", 2), ("b", 3)])
    assert spans == [MediaSpan(1, 3, "a"), MediaSpan(4, 7, "b")]
    with pytest.raises(ValueError):
        media_spans(ids, [8, 9], [("a", 2), ("b", 4)])


def block(n: int = 1) -> mx.array:
    return mx.zeros((n, 16), mx.float32)  # 64 bytes per n


def test_pool_lru_under_a_byte_cap() -> None:
    pool = BlockPool(capacity_bytes=3 * 64)
    for key in "abc":
        assert pool.put(key, block())
    pool.touch(["a"])  # now b is the least recently used
    assert pool.put("d", block())
    assert "b" not in pool and {"a", "c", "d"} == {k for k in "abcd" if k in pool}
    assert pool.nbytes == 3 * 64 and pool.counters.evictions == 1
    assert not pool.put("huge", block(4))  # larger than the whole pool


def test_referenced_blocks_are_never_evicted() -> None:
    pool = BlockPool(capacity_bytes=2 * 64)
    pool.put("a", block())
    pool.put("b", block())
    held = pool.match(["a", "b", "x"])
    assert [b.key for b in held] == ["a", "b"] and pool.counters.misses == 1
    assert not pool.put("c", block())  # every block is in use: nothing may go
    assert "a" in pool and "b" in pool and pool.counters.evictions == 0
    assert pool.reset() == 0  # reset too keeps what requests hold
    pool.release(held)
    assert pool.put("c", block()) and pool.counters.evictions == 1
    # match refreshes the chain head last, so the tail of a chain is evicted first
    assert "a" in pool and "b" not in pool


def test_match_stops_at_the_first_missing_key() -> None:
    pool = BlockPool(capacity_bytes=10 * 64)
    for key in "abd":
        pool.put(key, block())
    assert [b.key for b in pool.match(["a", "b", "c", "d"])] == ["a", "b"]
    assert pool.leading(["a", "b", "c", "d"]) == 2
    assert pool.counters.hits == 2 and pool.counters.misses == 2
