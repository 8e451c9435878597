"""The compiled decode step (issue #10, `PRISM_COMPILE_DECODE`): greedy tokens identical to the
uncompiled step, for a mixed batch (rows joining mid-decode, prompts of many lengths, one row
crossing a 256-token attention span) on tiny fp32 checkpoints, with full-precision and
quantized / windowed slot caches, Gemma 3's masks, and prompt-lookup speculation mixed in."""

from __future__ import annotations

import asyncio

import mlx.core as mx
import numpy as np
import pytest

from services.decoder.engine import DecoderEngine, Delta, EngineRequest
from shared.api import load
from shared.models.batch_cache import (
    T_STEP,
    BatchLayout,
    CompiledStep,
    make_batch_caches,
    row_bucket,
)
from shared.models.kv_quant import KVQuantConfig
from shared.runtime import mlx_thread
from shared.testing.fixtures import make_checkpoint
from shared.testing.gemma3_fixture import make_gemma3_checkpoint

ROWS, BUDGET = 8, 48
TEXTS = [
    "Tell me about the fox. " * 3,
    "x",
    "the cat sat on the mat. the cat sat on the mat. the cat",
    "Why? " * 9,
    "one two three four five six seven eight",
    "Summarise: " + "lorem ipsum dolor " * 5,
]
LONG = "a b c d e f g " * 24  # 229-254 tokens: its context crosses T_STEP while it decodes


def test_row_buckets_are_powers_of_two_then_slot_steps() -> None:
    got = [row_bucket(n, 32) for n in (1, 2, 3, 5, 8, 9, 17, 31, 32)]
    assert got == [1, 2, 4, 8, 8, 16, 24, 32, 32]
    assert row_bucket(5, 6) == 6 and row_bucket(3, 3) == 3  # never past max_slots


def test_a_stable_step_attends_over_whole_t_steps() -> None:
    layout = BatchLayout()
    cases = ((1, [3, 7], T_STEP), (1, [T_STEP], 2 * T_STEP), (4, [9], T_STEP), (1, [9], 10))
    for width, lengths, span in cases:
        layout.begin(np.array(lengths), 8, width, stable=span != 10)
        assert layout.span == span and layout.capacity >= span
        assert layout.mask is not None and layout.mask.shape == (len(lengths), 1, width, span)
        # Each row's query j sees exactly positions [0, lengths + j]: the padding is masked.
        seen = np.array(layout.mask.sum(axis=-1)).reshape(len(lengths), width)
        np.testing.assert_array_equal(seen, np.array(lengths)[:, None] + np.arange(width) + 1)


@pytest.mark.parametrize("max_traces", [64, 1])
def test_a_compiled_step_writes_the_same_kv_as_the_uncompiled_one(monkeypatch, max_traces):
    """The buffers go in and come out of the trace: after steps of 4 and 2 rows, crossing a
    span and a capacity boundary, every layer's keys/values and outputs equal the uncompiled
    step's, also when the traces start over at every new shape (max_traces 1)."""
    monkeypatch.setattr(CompiledStep, "MAX_TRACES", max_traces)

    def forward(caches: list) -> object:
        def run(tokens: mx.array, positions: mx.array) -> mx.array:
            out = []
            for cache in caches:
                shape = (tokens.shape[0], 2, 1, 8)
                k = mx.broadcast_to(positions[:, None, :, None].astype(mx.float32), shape)
                keys, values = cache.update_and_fetch(k * tokens[:, None, :, None], k + 1)
                out.append((keys * values).sum(axis=(1, 2, 3)))
            return mx.stack(out, axis=-1)

        return run

    results = []
    for compiled in (False, True):
        layout, caches = make_batch_caches(2)
        layout.reserve(2, 250, 8)
        for cache in caches:
            cache.insert(0, mx.ones((1, 2, 250, 8)), mx.ones((1, 2, 250, 8)))
        step = CompiledStep(forward(caches), caches) if compiled else forward(caches)
        lengths, outs = np.array([250, 0, 3, 0]), []
        for i in range(12):
            rows = 4 if i % 3 else 2
            layout.begin(lengths[:rows], 8, stable=True)
            tokens = mx.array([[i + 1]] * rows)
            outs.append(step(tokens, mx.array(lengths[:rows].astype(np.int32))[:, None]))
            lengths[0] += 1
        assert layout.capacity == 2 * T_STEP  # the first row crossed into a second T_STEP
        if compiled:
            assert len(step.shapes) <= max_traces
        results.append((outs, [c.state for c in caches]))
    (a, sa), (b, sb) = results
    assert all(mx.array_equal(x, y) for x, y in zip(a, b, strict=True))
    for x, y in zip(sa, sb, strict=True):
        assert all(mx.array_equal(p, q) for p, q in zip(x, y, strict=True))


def scenario(model, monkeypatch, compiled: bool, **kwargs) -> tuple[list[list[int]], DecoderEngine]:
    """TEXTS and LONG: half at once, the rest once the first rows have decoded a while."""
    monkeypatch.setenv("PRISM_COMPILE_DECODE", "1" if compiled else "0")
    engine = DecoderEngine(
        model, "c", max_num_batched_tokens=BUDGET, max_num_seqs=ROWS, **kwargs
    )  # fmt: skip
    runner = engine.runner
    assert (runner.compiled is not None) == compiled
    rows: list[int] = []  # each compiled step's row count
    if runner.compiled is not None:
        step = runner.compiled

        def counted(tokens: mx.array, positions: mx.array) -> mx.array:
            rows.append(tokens.shape[0])
            return step(tokens, positions)

        runner.compiled = counted  # type: ignore[assignment]
    prompts = [model.processor([{"role": "user", "content": t}]) for t in [*TEXTS, LONG]]
    reqs = [
        EngineRequest(f"r{i}", p, max_tokens=10 + 5 * i, ignore_eos=True)
        for i, p in enumerate(prompts)
    ]

    async def run() -> list[list[int]]:
        first = [engine.submit(r) for r in reqs[:3]]
        outs: list[list[int]] = [[] for _ in reqs]
        handles = dict(enumerate(first))
        async for event in first[0]:  # late joiners arrive while row 0 decodes
            if isinstance(event, Delta):
                outs[0] += event.token_ids
                if len(outs[0]) == 6:
                    handles.update({i: engine.submit(r) for i, r in enumerate(reqs) if i >= 3})
        del handles[0]
        for i, h in handles.items():
            outs[i] = [t async for e in h if isinstance(e, Delta) for t in e.token_ids]
        return outs

    engine.start()
    try:
        outs = asyncio.run(run())
    finally:
        engine.shutdown()
    assert not compiled or (rows and set(rows) <= {1, 2, 4, ROWS}), rows
    return outs, engine


@pytest.fixture(scope="module")
def qwen(checkpoint_factory):
    return mlx_thread.run_sync(
        lambda: load(checkpoint_factory("qwen2_5_vl", "hf"), components=["language"])
    )


def compare(model, monkeypatch, **kwargs) -> None:
    plain, _ = scenario(model, monkeypatch, False, **kwargs)
    fast, engine = scenario(model, monkeypatch, True, **kwargs)
    assert [len(t) for t in fast] == [10 + 5 * i for i in range(len(fast))]
    assert fast == plain
    assert engine.runner.layout.capacity == 0  # every row released
    # The long row crossed a span boundary (a second trace) while it decoded.
    prompt_len = len(model.processor([{"role": "user", "content": LONG}]).input_ids)
    assert prompt_len < T_STEP < prompt_len + len(fast[-1])


def test_compiled_matches_uncompiled_in_a_mixed_batch(qwen, monkeypatch):
    compare(qwen, monkeypatch)


@pytest.fixture(scope="module")
def qwen3_small(tmp_path_factory):
    """head_dim 64, which every KV quantization scheme packs."""
    path = make_checkpoint("qwen3", tmp_path_factory.mktemp("q3") / "hf", "hf", size="small")
    return mlx_thread.run_sync(lambda: load(path, components=["language"]))


@pytest.mark.parametrize(
    "kv", [KVQuantConfig(8), KVQuantConfig(3.5, scheme="turboquant"), KVQuantConfig(max_kv_size=64)]
)
def test_compiled_matches_uncompiled_with_quantized_kv(qwen3_small, monkeypatch, kv):
    compare(qwen3_small, monkeypatch, kv_quant=kv)


def test_compiled_matches_uncompiled_with_speculation(qwen, monkeypatch):
    """Prompt lookup: wide verification steps (uncompiled) interleave with compiled ones."""
    compare(qwen, monkeypatch, draft_kind="ngram")


def test_compiled_matches_uncompiled_for_gemma3(tmp_path, monkeypatch):
    """Gemma 3 builds its sliding-window masks from the layout's write positions."""
    path = make_gemma3_checkpoint(tmp_path / "gemma3", "hf")
    model = mlx_thread.run_sync(lambda: load(path, components=["language"]))
    compare(model, monkeypatch)
