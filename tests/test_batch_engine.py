"""Continuous batching (fp32, greedy): every stream is token-identical to running it alone.

16 requests (text of many lengths and images of several sizes) on a tiny Qwen2.5-VL, with a
32-token step budget so prompts are chunk-prefilled over several steps (the long one over 8)
and at most 8 rows decode, arrive in several orders: at once, mid-decode, and while a long
prompt is being chunk-prefilled between decode steps.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from services.decoder.engine import DecoderEngine, Delta, EngineRequest, Finish
from shared.api import load, stream_generate
from shared.media.types import ProcessedPrompt
from shared.models.base import MediaFeatures
from shared.runtime import mlx_thread
from shared.runtime.generate import encode_media

BUDGET, ROWS = 32, 8


@dataclass
class Case:
    prompt: ProcessedPrompt
    features: list[MediaFeatures]
    max_tokens: int
    tokens: list[int] | None = None  # run alone through the engine
    text: str = ""


def image(seed: int, width: int, height: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def messages(i: int) -> list[dict]:
    if i % 3 == 0:  # an image of one of three sizes, then a question of varying length
        size = [(56, 56), (84, 56), (112, 84)][(i // 3) % 3]
        parts = [{"type": "image", "image": image(i, *size)}]
        return [{"role": "user", "content": parts + [{"type": "text", "text": "Why? " * i}]}]
    repeats = 12 if i == 5 else 1 + (i * 5) % 6  # one long prompt: ~14 chunks
    return [{"role": "user", "content": "Tell me about the fox. " * repeats}]


@pytest.fixture(scope="module")
def setup(checkpoint_factory) -> tuple:
    path = checkpoint_factory("qwen2_5_vl", "hf")

    def build() -> tuple:
        full = load(path)
        cases = []
        for i in range(16):
            prompt = full.processor(messages(i))
            features = encode_media(full, prompt.media)
            mx.eval([f.tensors() for f in features])
            cases.append(Case(prompt, features, max_tokens=24 + (i * 5) % 24))
        api = {  # the in-process path, for a short, a long and an image prompt
            i: [
                c.token
                for c in stream_generate(full, cases[i].prompt, max_tokens=cases[i].max_tokens)
            ]
            for i in (1, 5, 6)
        }
        return load(path, components=["language"]), cases, api

    return mlx_thread.run_sync(build)


@contextmanager
def running(model, **kwargs) -> Iterator[DecoderEngine]:
    engine = DecoderEngine(model, "vl", max_num_batched_tokens=BUDGET, max_num_seqs=ROWS, **kwargs)
    engine.start()
    try:
        yield engine
    finally:
        engine.shutdown()


def request(case: Case, rid: str = "t", **kwargs) -> EngineRequest:
    kwargs.setdefault("max_tokens", case.max_tokens)
    kwargs.setdefault("ignore_eos", True)  # every stream runs its full length
    return EngineRequest(rid, case.prompt, case.features, **kwargs)


async def submit_and_consume(engine: DecoderEngine, req: EngineRequest):
    return await consume(engine.submit(req))


async def consume(handle, progress: Progress | None = None) -> tuple[list[int], str, Finish]:
    tokens, text = [], ""
    async for event in handle:
        if isinstance(event, Delta):
            tokens += event.token_ids
            text += event.text
            if progress is not None:
                await progress.tick()
        else:
            return tokens, text, event
    raise AssertionError("no Finish")


class Progress:
    """Counts deltas across all streams, so arrivals can wait for `n` of them (no sleeps)."""

    def __init__(self) -> None:
        self.count, self.cond = 0, asyncio.Condition()

    async def tick(self) -> None:
        async with self.cond:
            self.count += 1
            self.cond.notify_all()

    async def reach(self, n: int) -> None:
        async with self.cond:
            await self.cond.wait_for(lambda: self.count >= n)


@pytest.fixture(scope="module")
def alone(setup) -> list[Case]:
    """Each case run alone through an engine of the same configuration."""
    model, cases, api = setup
    with running(model) as engine:
        for case in cases:
            case.tokens, case.text, finish = asyncio.run(submit_and_consume(engine, request(case)))
            assert finish.reason in ("length", "stop")
    for i, tokens in api.items():  # shared.api stops at EOS; the engine ignored it
        assert cases[i].tokens[: len(tokens)] == tokens, f"case {i} differs from shared.api"
    return cases


def arrivals(cases: list[Case], order: list[int], rng: np.random.Generator) -> list[int]:
    """A reachable delta count to wait for before each arrival (0 = at once)."""
    out, done = [], 0
    for i in order:
        low = out[-1] if out else 0
        out.append(int(rng.integers(low, max(low, done) + 1)) if rng.random() < 0.7 else low)
        done += len(cases[i].tokens or [])
    return out


async def mix(engine: DecoderEngine, cases: list[Case], order: list[int], waits: list[int]):
    progress, tasks = Progress(), {}
    for i, wait in zip(order, waits, strict=True):
        await progress.reach(wait)
        handle = engine.submit(request(cases[i], f"r{i}"))
        tasks[i] = asyncio.create_task(consume(handle, progress))
    return {i: await task for i, task in tasks.items()}


def test_concurrent_greedy_streams_match_running_alone(setup, alone):
    model = setup[0]
    longest = max(range(16), key=lambda i: len(alone[i].prompt.input_ids))
    rng = np.random.default_rng(0)
    # Three streams start decoding, the long prompt arrives mid-decode, and the rest arrive
    # while it is still being chunk-prefilled (the three keep decoding meanwhile).
    first = [i for i in range(16) if i != longest]
    orders = [first[:3] + [longest] + first[3:], list(rng.permutation(16)), first[::-1] + [longest]]
    with running(model) as engine:
        for n, order in enumerate(orders):
            waits = [0, 0, 0, 3] + [5] * 12 if n == 0 else arrivals(alone, order, rng)
            results = asyncio.run(mix(engine, alone, order, waits))
            for i, (tokens, text, finish) in results.items():
                assert tokens == alone[i].tokens, f"order {n}: case {i}"
                assert text == alone[i].text and finish.completion_tokens == len(tokens)
        stats = engine.stats()
        assert (stats.running, stats.waiting, stats.kv_tokens) == (0, 0, 0)


def test_stop_strings_in_a_batch(setup, alone):
    model = setup[0]
    picks = [i for i in range(16) if len(alone[i].text) > 4][:3]
    stops = {i: alone[i].text[2:4] for i in picks}  # spans whatever tokens it spans

    async def scenario(engine: DecoderEngine) -> None:
        handles = {
            i: engine.submit(request(c, stop=(stops.get(i, "\0never"),)))
            for i, c in enumerate(alone)
        }
        for i, handle in handles.items():
            tokens, text, finish = await consume(handle)
            if i in picks:
                cut = alone[i].text.index(stops[i])
                assert text == alone[i].text[:cut] and finish.reason == "stop"
                assert finish.stop_sequence == stops[i]
            else:
                assert tokens == alone[i].tokens

    with running(model) as engine:
        asyncio.run(scenario(engine))


def test_cancelling_5_of_20_leaves_the_rest_exact_and_nothing_behind(setup, alone):
    model = setup[0]
    cases = alone + alone[:4]  # 20 streams (duplicate prompts decode identically)
    longest = max(range(16), key=lambda i: len(alone[i].prompt.input_ids))
    cancel_after = {3: 0, longest: -1, 7: 1, 10: 3, 17: 2}  # own deltas; -1: during prefill

    async def scenario(engine: DecoderEngine) -> None:
        progress, handles = Progress(), {}
        for i, case in enumerate(cases):
            handles[i] = engine.submit(request(case, f"r{i}"))
            if cancel_after.get(i) == 0:
                handles[i].cancel()  # still waiting (or just admitted)

        async def run(i: int):
            if cancel_after.get(i) == -1:  # a couple of steps in: its prompt is still chunking
                await asyncio.sleep(0)
                handles[i].cancel()
            seen, tokens = 0, []
            async for event in handles[i]:
                if isinstance(event, Finish):
                    return tokens, event
                seen += 1
                tokens += event.token_ids
                await progress.tick()
                if seen == cancel_after.get(i):
                    handles[i].cancel()
            raise AssertionError("no Finish")

        results = await asyncio.gather(*(run(i) for i in range(20)))
        for i, (tokens, finish) in enumerate(results):
            if i in cancel_after:
                assert finish.reason == "cancelled", i
                assert tokens == cases[i].tokens[: len(tokens)]
            else:
                assert tokens == cases[i].tokens and finish.reason != "cancelled", i

    with running(model) as engine:
        asyncio.run(scenario(engine))
        stats = engine.stats()
        assert (stats.running, stats.waiting, stats.kv_tokens, stats.kv_usage) == (0, 0, 0, 0.0)
        assert not engine.scheduler.has_work() and not engine.runner.occupied.any()
        assert all(c.keys is None for c in engine.runner.caches)  # the KV buffers were freed


class ForcedTokens:
    """A TokenConstraint that allows exactly one token at each step, then finishes."""

    def __init__(self, tokens: list[int], vocab: int) -> None:
        self.tokens, self.vocab, self.accepted = tokens, vocab, []

    def allowed(self) -> np.ndarray | None:
        mask = np.zeros(self.vocab + 7, bool)  # longer than the vocab is allowed
        mask[self.tokens[len(self.accepted)]] = True
        return mask

    def accept(self, token: int) -> None:
        self.accepted.append(token)

    def finished(self) -> bool:
        return len(self.accepted) == len(self.tokens)


def test_constraints_mask_their_row_only(setup, alone):
    model = setup[0]
    forced = [5, 9, 5, 200]

    async def scenario(engine: DecoderEngine) -> None:
        constraint = ForcedTokens(forced, engine.vocab_size)
        free = [engine.submit(request(alone[i], f"f{i}")) for i in (2, 3, 4)]
        held = engine.submit(request(alone[0], "c", max_tokens=20, constraints=[constraint]))
        tokens, _, finish = await consume(held)
        assert tokens == forced and constraint.accepted == forced and finish.reason == "stop"
        for i, handle in zip((2, 3, 4), free, strict=True):
            assert (await consume(handle))[0] == alone[i].tokens
        # A constraint that raises fails its own request only.
        broken = ForcedTokens([5, 9], engine.vocab_size)
        broken.accept = lambda token: 1 / 0  # type: ignore[method-assign]
        bad = engine.submit(request(alone[0], "b", constraints=[broken]))
        good = engine.submit(request(alone[2], "g"))
        finish = (await consume(bad))[2]
        assert finish.reason == "error" and "ZeroDivisionError" in finish.error
        assert (await consume(good))[0] == alone[2].tokens

    with running(model) as engine:
        asyncio.run(scenario(engine))


def test_prefill_chunks_that_split_an_image_block(setup, alone):
    model = setup[0]
    images = [i for i in range(16) if alone[i].features]
    engine = DecoderEngine(model, "vl", max_num_batched_tokens=7, max_num_seqs=2)
    engine.start()
    try:
        for i in images:
            tokens, _, _ = asyncio.run(submit_and_consume(engine, request(alone[i])))
            assert tokens == alone[i].tokens, i
    finally:
        engine.shutdown()
