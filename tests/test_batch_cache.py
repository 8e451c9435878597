"""The slot batch cache: batched decode over rows of different lengths and rotary offsets gives
each row exactly what a one-sequence KVCache gives, through joins, leaves and resizes."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from shared.api import load
from shared.models.batch_cache import T_STEP, make_batch_caches
from shared.runtime import mlx_thread

SLOTS = 8


class Row:
    """One sequence decoded alone (the reference), position = cache length + shift."""

    def __init__(self, lm, prompt: list[int], shift: int) -> None:
        self.lm, self.shift, self.cache = lm, shift, lm.make_cache()
        pos = mx.array((np.arange(len(prompt)) + shift)[None].astype(np.int32))
        logits = lm(mx.array([prompt]), self.cache, position_ids=pos)
        self.token = mx.argmax(logits[:, -1], axis=-1)
        self.length = len(prompt)

    def step(self) -> np.ndarray:
        pos = mx.full((1, 1), self.length + self.shift, dtype=mx.int32)
        logits = self.lm(self.token[:, None], self.cache, position_ids=pos)[:, -1]
        self.token, self.length = mx.argmax(logits, axis=-1), self.length + 1
        return np.array(logits[0])


def run(lm) -> None:
    rng = np.random.default_rng(0)
    vocab = lm.args.vocab_size
    lengths_wanted = [(5, 0), (T_STEP - 3, 7), (17, 0), (40, 3)]  # one crosses T_STEP
    rows = [Row(lm, rng.integers(0, vocab, n).tolist(), s) for n, s in lengths_wanted]
    layout, caches = make_batch_caches(len(lm.layers))
    lengths, shifts = np.zeros(SLOTS, np.int64), np.zeros(SLOTS, np.int64)
    live: dict[int, Row] = {}
    tokens = mx.zeros((SLOTS,), mx.int32)

    def join(slot: int, row: Row) -> None:
        nonlocal tokens
        layout.reserve(slot, row.length, SLOTS)
        for batch_cache, own in zip(caches, row.cache, strict=True):
            batch_cache.insert(slot, *own.state)
        lengths[slot], shifts[slot], live[slot] = row.length, row.shift, row
        tokens[slot] = row.token[0]

    join(0, rows[0])
    join(2, rows[1])  # slot 1 stays free: a gap row computes garbage
    for step in range(12):
        if step == 3:
            join(1, rows[2])  # joins mid-way
        if step == 6:  # the long row leaves: lengths drop, the capacity shrinks
            del live[2]
            lengths[2] = 0
            assert layout.shrink(int(lengths.max()))
            join(5, rows[3])
        n = max(live) + 1
        layout.begin(lengths[:n], SLOTS)
        pos = mx.array((lengths[:n] + shifts[:n]).astype(np.int32))[:, None]
        logits = lm(tokens[:n, None], caches, position_ids=pos)[:, -1]
        tokens = mx.argmax(logits, axis=-1).astype(mx.int32)
        tokens = mx.concatenate([tokens, mx.zeros((SLOTS - n,), mx.int32)])
        for slot, row in live.items():
            np.testing.assert_allclose(np.array(logits[slot]), row.step(), rtol=0, atol=1e-5)
            lengths[slot] += 1
    assert caches[0].keys is not None and caches[0].keys.shape[2] == layout.capacity
    assert layout.capacity == T_STEP  # shrunk back after the long row left


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3"])
def test_batched_decode_matches_one_sequence_decode(checkpoint_factory, family):
    path = checkpoint_factory(family, "hf")
    mlx_thread.run_sync(lambda: run(load(path, components=["language"]).language))


def test_batch_cache_refuses_a_width_the_step_was_not_laid_out_for():
    layout, [cache] = make_batch_caches(1)
    layout.begin(np.array([3, 1]), SLOTS)
    with pytest.raises(ValueError, match="feeds 1 token"):
        cache.make_mask(4)
    layout.begin(np.array([3, 1]), SLOTS, width=3)
    assert cache.make_mask(3).shape == (2, 1, 3, T_STEP)
    with pytest.raises(ValueError, match="feeds 3 token"):
        cache.make_mask(1)


def full_logits(lm, tokens: list[int], shift: int, width: int) -> np.ndarray:
    """The last `width` positions' logits of `tokens` run from scratch (the reference)."""
    pos = mx.array((np.arange(len(tokens)) + shift)[None].astype(np.int32))
    return np.array(lm(mx.array([tokens]), lm.make_cache(), position_ids=pos)[0, -width:])


def run_wide(lm) -> None:
    """Steps of several tokens per row, each row keeping a different number of them (the
    rest rolled back by lowering its length), match running each history from scratch."""
    rng = np.random.default_rng(1)
    vocab = lm.args.vocab_size
    shifts = [0, 5, 0]
    histories = [rng.integers(0, vocab, n).tolist() for n in (6, 20, 11)]
    layout, caches = make_batch_caches(len(lm.layers))
    lengths = np.zeros(len(histories), np.int64)
    for slot, (hist, shift) in enumerate(zip(histories, shifts, strict=True)):
        cache = lm.make_cache()
        pos = mx.array((np.arange(len(hist)) + shift)[None].astype(np.int32))
        lm(mx.array([hist]), cache, position_ids=pos)
        layout.reserve(slot, len(hist), SLOTS)
        for batch_cache, own in zip(caches, cache, strict=True):
            batch_cache.insert(slot, *own.state)
        lengths[slot] = len(hist)
    for width, keep in ((3, [0, 3, 1]), (1, [1, 1, 1]), (4, [2, 0, 4]), (2, [2, 1, 0])):
        fed = rng.integers(0, vocab, (len(histories), width))
        layout.begin(lengths, SLOTS, width)
        pos = (lengths + np.array(shifts))[:, None] + np.arange(width)[None]
        logits = lm(mx.array(fed), caches, position_ids=mx.array(pos.astype(np.int32)))
        for row, hist in enumerate(histories):
            want = full_logits(lm, hist + fed[row].tolist(), shifts[row], width)
            np.testing.assert_allclose(np.array(logits[row]), want, rtol=0, atol=1e-4)
            hist += fed[row, : keep[row]].tolist()  # keep some; the rest is rolled back
            lengths[row] += keep[row]


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3"])
def test_wide_steps_with_per_row_rollback_match_from_scratch(checkpoint_factory, family):
    path = checkpoint_factory(family, "hf")
    mlx_thread.run_sync(lambda: run_wide(load(path, components=["language"]).language))


def test_wide_layout_geometry():
    layout, _ = make_batch_caches(1)
    layout.begin(np.array([2, 0]), SLOTS, width=2)
    assert layout.span == T_STEP  # wide steps attend over whole T_STEPs (one kernel shape)
    mask = np.array(layout.mask)  # (rows, 1, width, span)
    assert mask.shape == (2, 1, 2, T_STEP)
    assert not mask[:, :, :, 4:].any()  # the padding is never visible
    mask = mask[:, :, :, :4]
    assert mask[0, 0].tolist() == [[True, True, True, False], [True, True, True, True]]
    assert mask[1, 0].tolist() == [[True, False, False, False], [True, True, False, False]]
    cap = layout.capacity
    assert np.array(layout.flat_index(2)).tolist() == [
        2, 3, cap + 2, cap + 3, 2 * cap, 2 * cap + 1, 3 * cap, 3 * cap + 1
    ]  # fmt: skip
