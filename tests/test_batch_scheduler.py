"""Admission (slots, KV budget, bounded queue), the per-step token budget, and the metrics the
gateway reports from the decoders' Stats."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
from prism.v1 import decoder_pb2

from services.decoder.engine import DecoderEngine, Delta, EngineRequest, Finish
from services.decoder.scheduler import Scheduler
from services.gateway.metrics import GatewayMetrics
from shared.api import load
from shared.errors import InvalidRequestError, OverloadedError
from shared.runtime import mlx_thread


@dataclass(eq=False)
class Seq:
    prompt_len: int
    reserved: int
    prefilled: int = 0
    slot: int = -1


def test_token_budget_and_kv_admission():
    sched = Scheduler(max_num_seqs=3, max_num_batched_tokens=10, kv_tokens=100)
    a, b, c, d = Seq(25, 40), Seq(4, 10), Seq(3, 50), Seq(2, 5)
    for s in (a, b, c, d):
        sched.add(s)
    assert sched.schedule(decoding=0) == [(a, 10)]  # one chunk uses the whole budget
    a.prefilled = 10
    # 2 rows decode: 8 tokens left; a takes them; b waits although it would fit.
    assert sched.schedule(decoding=2) == [(a, 8)]
    a.prefilled = 18
    # a's last 7 tokens, then b is admitted (2 rows x 40 = 80 <= 100) and gets the rest.
    assert sched.schedule(decoding=0) == [(a, 7), (b, 3)]
    a.prefilled, b.prefilled = 25, 3
    sched.prefill_done(a)
    # c does not fit (3 rows x 50 = 150 > 100); d, behind it, must wait too (FIFO).
    assert sched.schedule(decoding=1) == [(b, 1)]
    assert (a.slot, b.slot, c.slot) == (0, 1, -1) and sched.kv.used == 80
    sched.free(a)
    sched.free(b)  # prefilling: its slot and KV go back too
    assert sched.kv.used == 0 and sched.schedule(decoding=0) == [(c, 3), (d, 2)]
    assert (c.slot, d.slot) == (0, 1)  # the lowest slots first, keeping rows dense
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        Scheduler(max_num_seqs=8, max_num_batched_tokens=4, kv_tokens=100)


# ---- on the engine: a tiny Qwen3 --------------------------------------------------------


@pytest.fixture(scope="module")
def model(checkpoint_factory):
    return mlx_thread.run_sync(load, checkpoint_factory("qwen3", "hf"), components=["language"])


def prompt(model, text: str = "Tell me a story."):
    return model.processor([{"role": "user", "content": text}])


async def first_event(handle):
    return await handle.__anext__()


async def drain(handle) -> tuple[int, Finish]:
    n = 0
    async for event in handle:
        if isinstance(event, Finish):
            return n, event
        n += 1
    raise AssertionError("no Finish")


def test_full_queue_is_refused_before_anything_streams(model):
    async def scenario(engine: DecoderEngine) -> None:
        running = engine.submit(EngineRequest("a", prompt(model), max_tokens=400, ignore_eos=True))
        assert isinstance(await first_event(running), Delta)  # admitted: the queue is empty
        queued = [
            engine.submit(EngineRequest(f"q{i}", prompt(model), max_tokens=2, ignore_eos=True))
            for i in (1, 2)
        ]
        assert engine.stats().waiting == 2
        with pytest.raises(OverloadedError):
            engine.submit(EngineRequest("x", prompt(model), max_tokens=2))
        running.cancel()
        assert (await drain(running))[1].reason == "cancelled"
        for handle in queued:
            assert (await drain(handle))[1].reason == "length"

    engine = DecoderEngine(model, "tiny", max_num_seqs=1, max_waiting=2)
    engine.start()
    try:
        asyncio.run(scenario(engine))
    finally:
        engine.shutdown()


def test_admission_waits_for_kv_and_proceeds_when_a_row_finishes(model):
    p = prompt(model)
    budget = 2 * (len(p.input_ids) + 30) - 1  # room for one request of 30 tokens, not two

    async def scenario(engine: DecoderEngine) -> None:
        first = engine.submit(EngineRequest("a", p, max_tokens=30, ignore_eos=True))
        assert isinstance(await first_event(first), Delta)
        second = engine.submit(EngineRequest("b", p, max_tokens=30, ignore_eos=True))
        for _ in range(5):  # a keeps decoding while b waits for KV (not for a slot)
            assert isinstance(await first_event(first), Delta)
            stats = engine.stats()
            assert (stats.running, stats.waiting) == (1, 1) and stats.kv_usage > 0.5
        done = asyncio.create_task(drain(first))
        assert isinstance(await first_event(second), Delta)
        assert done.done() and (await done)[1].reason == "length"  # b began after a ended
        assert (await drain(second))[1].completion_tokens == 30
        with pytest.raises(InvalidRequestError, match="KV cache"):
            engine.submit(EngineRequest("big", p, max_tokens=budget))

    engine = DecoderEngine(model, "tiny", kv_cache_tokens=budget)
    engine.start()
    try:
        asyncio.run(scenario(engine))
        assert engine.stats().kv_tokens == 0
    finally:
        engine.shutdown()


def test_gateway_metrics_report_the_decoders_stats():
    def decoder(model: str, running: int, waiting: int, kv: float, healthy: bool = True):
        stats = decoder_pb2.DecoderStatsResponse(
            num_requests_running=running, num_requests_waiting=waiting, kv_cache_usage=kv
        )
        return SimpleNamespace(kind="decoder", healthy=healthy, models={model: None}, stats=stats)

    backends = [
        decoder("m", 3, 1, 0.25),
        decoder("m", 2, 0, 0.75),
        decoder("m", 9, 9, 0.9, healthy=False),  # down: not counted
        SimpleNamespace(kind="encoder", healthy=True, models={"m": None}, stats=None),
    ]
    metrics = GatewayMetrics()
    metrics.watch_decoders(lambda: backends)
    text = metrics.render()[0].decode()
    assert 'prism:decoder_num_requests_running{model_name="m"} 5.0' in text
    assert 'prism:decoder_num_requests_waiting{model_name="m"} 1.0' in text
    assert 'prism:kv_cache_usage_perc{model_name="m"} 0.5' in text
