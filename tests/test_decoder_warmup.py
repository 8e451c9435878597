"""The decoder's start-up warm-up (`services.decoder.warmup`): dummy batches of every size go
through the real engine, leave no trace in its counters or prefix cache, and change nothing
about what a client then gets."""

from __future__ import annotations

import asyncio

import pytest

from services.decoder.engine import DecoderEngine, EngineRequest
from services.decoder.warmup import batch_sizes, wanted, warm_up
from shared.media.types import ProcessedPrompt
from shared.runtime import mlx_thread
from tests.engine_support import collect


def test_batch_sizes_double_up_to_the_limit() -> None:
    assert batch_sizes(32) == [1, 2, 4, 8, 16, 32]
    assert batch_sizes(6) == [1, 2, 4, 6]
    assert batch_sizes(1) == [1]


def test_auto_means_gpu_only() -> None:
    import mlx.core as mx

    assert wanted("on") and not wanted("off")
    assert wanted("auto") == (mx.default_device() == mx.gpu)


@pytest.fixture(scope="module")
def model(checkpoint_factory):
    from shared.api import load

    path = checkpoint_factory("qwen2_5_vl", "hf")
    return mlx_thread.run_sync(lambda: load(path, components=["language"]))


def _client(engine: DecoderEngine) -> list[int]:
    req = EngineRequest("c", ProcessedPrompt(list(range(5, 40))), max_tokens=12, ignore_eos=True)
    tokens, finish = asyncio.run(collect(engine, req))
    assert finish.reason == "length"
    return tokens


def test_warm_up_serves_every_batch_size_and_leaves_no_trace(model) -> None:
    def engine() -> DecoderEngine:
        e = DecoderEngine(model, "vl", max_num_seqs=6, max_num_batched_tokens=64)
        e.start()
        return e

    cold = engine()
    try:
        expected = _client(cold)
    finally:
        cold.shutdown()

    warm = engine()
    try:
        seconds = asyncio.run(warm_up(warm))
        assert seconds > 0
        stats = warm.stats()
        assert (stats.requests_total, stats.prompt_tokens_total) == (0, 0)
        assert (stats.running, stats.waiting, stats.kv_tokens) == (0, 0, 0)
        assert len(warm.prefix.pool) == 0  # dummy prompts carry no prefix keys
        assert _client(warm) == expected
        assert warm.stats().requests_total == 1
    finally:
        warm.shutdown()
