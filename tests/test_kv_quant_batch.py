"""Quantized / windowed KV caches in continuous batching: a mixed batch (rows joining at
different steps, a free gap row, prompts longer than the window) gives every row the tokens it
gets alone through the single-sequence path with the same cache; the decoder engine with APC
gives the tokens of `stream_generate` with the same flags; admission counts the smaller
footprint; `prism generate` takes the flags and refuses bad ones."""

from __future__ import annotations

import asyncio
import dataclasses

import mlx.core as mx
import numpy as np
import pytest

from services.cli import main as prism
from services.decoder.apc.prefix import PrefixConfig
from services.decoder.config import EngineConfig
from services.decoder.engine import DecoderEngine, EngineRequest, Finish
from shared.api import load, stream_generate
from shared.models.cache import KVCache
from shared.models.kv_quant import (
    BatchQuantCache,
    KVQuantConfig,
    WindowLayout,
    decode_caches,
    make_batch_caches,
)
from shared.runtime import mlx_thread
from shared.testing.fixtures import make_checkpoint
from tests.engine_support import collect
from tests.test_kv_quant_quality import tiny_model

SLOTS = 8
STEPS = 16
CONFIGS = [
    KVQuantConfig(4),
    KVQuantConfig(8, max_kv_size=32),
    KVQuantConfig(3.5, "turboquant"),
    KVQuantConfig(3.5, "turboquant", max_kv_size=32),
    KVQuantConfig(max_kv_size=32),  # a window at full precision
]


class Alone:
    """One prompt through the single-sequence path: fp prefill, then `decode_caches`."""

    def __init__(self, lm, prompt: list[int], cfg: KVQuantConfig) -> None:
        self.lm, self.prefill = lm, [KVCache() for _ in lm.layers]
        self.token = mx.argmax(lm(mx.array([prompt]), self.prefill)[:, -1], axis=-1)
        self.cache, self.length = decode_caches(self.prefill, cfg), len(prompt)

    def step(self) -> tuple[int, np.ndarray]:
        logits = self.lm(self.token[:, None], self.cache)[:, -1]
        self.token, self.length = mx.argmax(logits, axis=-1), self.length + 1
        return int(self.token.item()), np.array(logits[0])


def batched_vs_alone(lm, cfg: KVQuantConfig) -> None:
    rng = np.random.default_rng(3)
    lengths = [20, 45, 7, 33]  # 45 and 33 exceed a 32-token window
    rows = [Alone(lm, rng.integers(0, 512, n).tolist(), cfg) for n in lengths]
    layout, caches = make_batch_caches(len(lm.layers), cfg)
    length = np.zeros(SLOTS, np.int64)
    tokens = mx.zeros((SLOTS,), mx.int32)
    live: dict[int, Alone] = {}

    def join(slot: int, row: Alone) -> None:
        layout.reserve(slot, row.length, SLOTS)
        for cache, own in zip(caches, row.prefill, strict=True):
            cache.insert(slot, *own.state)
        length[slot], live[slot] = row.length, row
        tokens[slot] = row.token[0]

    join(0, rows[0])
    join(2, rows[1])  # slot 1 is a free gap row
    for step in range(STEPS):
        if step == 3:
            join(1, rows[2])
        if step == 6:
            join(4, rows[3])
        n = max(live) + 1
        layout.begin(length[:n], SLOTS)
        pos = mx.array(length[:n].astype(np.int32))[:, None]
        logits = lm(tokens[:n, None], caches, position_ids=pos)[:, -1]
        tokens = mx.concatenate([mx.argmax(logits, -1).astype(mx.int32), tokens[n:]])
        for slot, row in live.items():
            token, alone = row.step()
            assert int(tokens[slot].item()) == token, (cfg.describe(), step, slot)
            np.testing.assert_allclose(np.array(logits[slot]), alone, rtol=0, atol=1e-3)
            length[slot] += 1


@pytest.mark.parametrize("cfg", CONFIGS, ids=KVQuantConfig.describe)
def test_a_mixed_batch_gives_each_row_its_tokens_alone(cfg):
    mlx_thread.run_sync(lambda: batched_vs_alone(tiny_model(), cfg))


# ---- the engine, with APC, against `stream_generate` ------------------------------------------


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """The "small" Qwen3 fixture: head_dim 64, 8 layers, a tokenizer (the engine needs one)."""
    root = tmp_path_factory.mktemp("kvq-small")
    return make_checkpoint("qwen3", root / "qwen3", "hf", size="small")


QUESTIONS = ["Tell me a long story about the sea.", "Tell me a long story about a fox.", "Hi"]


def engine_run(model, cfg: KVQuantConfig) -> list[tuple[list[int], Finish]]:
    """The questions concurrently, then the first again (an APC hit); prefill chunks of 8."""
    econf = EngineConfig(kv_quant=cfg, prefix=PrefixConfig(block_size=4, num_blocks=256))
    engine = DecoderEngine(model, "q", econf, max_num_batched_tokens=8, max_num_seqs=4)
    engine.start()
    assert isinstance(engine.runner.caches[0], BatchQuantCache)
    assert isinstance(engine.runner.layout, WindowLayout) == bool(cfg.max_kv_size)

    def request(i: int, text: str) -> EngineRequest:
        prompt = model.processor([{"role": "user", "content": text}])
        keys = engine.prefix.keys(prompt.input_ids, [], "")
        return EngineRequest(f"r{i}", prompt, max_tokens=12, ignore_eos=True, prefix_keys=keys)

    async def scenario() -> list[tuple[list[int], Finish]]:
        first = await asyncio.gather(
            *(collect(engine, request(i, q)) for i, q in enumerate(QUESTIONS))
        )
        return [*first, await collect(engine, request(9, QUESTIONS[0]))]

    try:
        return asyncio.run(scenario())
    finally:
        engine.shutdown()


@pytest.mark.parametrize(
    "cfg",
    [KVQuantConfig(8), KVQuantConfig(3.5, "turboquant", max_kv_size=24)],
    ids=KVQuantConfig.describe,
)
def test_engine_with_apc_matches_stream_generate(small, cfg):
    model = mlx_thread.run_sync(lambda: load(small, components=["language"]))
    results = engine_run(model, cfg)

    def alone(text: str) -> list[int]:
        chunks = stream_generate(model, text, max_tokens=12, kv_quant=cfg)
        return [c.token for c in chunks if c.token is not None]

    expected = mlx_thread.run_sync(lambda: [alone(q) for q in QUESTIONS])
    for (tokens, finish), want in zip(results, [*expected, expected[0]], strict=True):
        assert finish.reason == "length" and tokens == want
    assert results[-1][1].cached_tokens > 0  # the repeat reused the first one's blocks


def test_admission_counts_the_quantized_footprint(small):
    model = mlx_thread.run_sync(lambda: load(small, components=["language"]))
    budget = EngineConfig(kv_cache_memory_mb=64)
    full = budget.resolve(model)
    for cfg in (KVQuantConfig(8), KVQuantConfig(4), KVQuantConfig(3.5, "turboquant")):
        quant = dataclasses.replace(budget, kv_quant=cfg).resolve(model)
        # 8 layers x 2 KV heads of 64 dims, fp32 activations.
        assert quant.kv_bytes_per_token == cfg.bytes_per_token(8, 2, 64, 4)
        assert quant.kv_tokens == 64 * 2**20 // quant.kv_bytes_per_token > 3 * full.kv_tokens
    with pytest.raises(ValueError, match="head_dim % 128"):
        dataclasses.replace(budget, kv_quant=KVQuantConfig(8, group_size=128)).resolve(model)


def test_a_window_reserves_at_most_its_size(small):
    """With --max-kv-size a slot never holds more than the window, so admission reserves that
    (a 48-token budget admits two requests of prompt + max_tokens > 48 at once)."""
    model = mlx_thread.run_sync(lambda: load(small, components=["language"]))
    cfg = EngineConfig(kv_quant=KVQuantConfig(8, max_kv_size=24), kv_cache_tokens=48)
    assert cfg.resolve(model).kv_tokens == 48
    assert (
        EngineConfig(kv_quant=KVQuantConfig(max_kv_size=24), max_num_seqs=3)
        .resolve(model)
        .kv_tokens
        == 3 * 24
    )
    engine = DecoderEngine(model, "q", cfg, max_num_seqs=4)
    engine.start()
    seen: list[int] = []

    async def scenario() -> None:
        async def one(i: int) -> None:
            prompt = model.processor([{"role": "user", "content": QUESTIONS[i]}])
            req = EngineRequest(f"w{i}", prompt, max_tokens=40, ignore_eos=True)
            async for event in engine.submit(req):
                seen.append(len(engine.core.scheduler.running))
                if isinstance(event, Finish):
                    assert event.reason == "length"

        await asyncio.gather(one(0), one(1))

    try:
        asyncio.run(scenario())
    finally:
        engine.shutdown()
    assert max(seen) == 2  # both decoded together: each reserved 24, not prompt + 40


def test_prism_generate_takes_the_flags(small, capsys):
    args = ["generate", "--model", str(small), "--prompt", "Hi", "--max-tokens", "6"]
    flags = ["--kv-bits", "3.5", "--kv-quant-scheme", "turboquant", "--max-kv-size", "16"]
    assert prism([*args, *flags]) == 0
    expected = "".join(
        c.text
        for c in stream_generate(
            load(small),
            "Hi",
            max_tokens=6,
            kv_quant=KVQuantConfig(3.5, "turboquant", max_kv_size=16),
        )
    )
    assert capsys.readouterr().out == expected + "\n"
    assert prism([*args, "--kv-bits", "5", "--kv-quant-scheme", "turboquant"]) == 2
    assert "turboquant kv bits 5" in capsys.readouterr().err


def test_a_window_is_refused_where_it_cannot_work(small):
    model = mlx_thread.run_sync(lambda: load(small, components=["language"]))
    window = EngineConfig(kv_quant=KVQuantConfig(max_kv_size=64))
    with pytest.raises(ValueError, match="speculative decoding"):
        dataclasses.replace(window, draft_kind="ngram").resolve(model)
    sliding = dataclasses.replace(model, config={**model.config, "use_sliding_window": True})
    with pytest.raises(ValueError, match="sliding-window model"):
        window.resolve(sliding)
