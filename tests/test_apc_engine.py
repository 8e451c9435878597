"""Automatic prefix caching in the batching engine (tiny Qwen2.5-VL, fp32, greedy).

Every request gives the same tokens as with APC off; `cached_tokens` is exactly the whole
blocks shared with what ran before (never the prompt's last token), stops at the first block
holding another image's placeholders, and is 0 across tenants.
"""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import pytest
from PIL import Image
from structlog.testing import capture_logs

from services.decoder.apc.prefix import PrefixCache, PrefixConfig
from services.decoder.config import EngineConfig, kv_dtype
from services.decoder.engine import DecoderEngine, EngineRequest, Finish
from shared.api import load
from shared.loading.config import text_config
from shared.runtime import mlx_thread
from tests.engine_support import collect, media_request, prepare_media_prompt

BS = 16
SYSTEM = "You are a careful assistant. Read the whole document before answering. " * 6


def image(seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 255, (56, 84, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def chat(question: str, picture: int | None = None) -> list[dict]:
    parts: list[dict] = [{"type": "text", "text": "Look at this: "}]
    if picture is not None:
        parts.append({"type": "image", "image": image(picture)})
    parts.append({"type": "text", "text": question})
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": parts}]


PROMPTS = {
    "a": chat("What is the first point? Answer in two sentences, citing the page. " * 2),
    "b": chat("Summarise the document for a busy reader, in plain words please. " * 2),
    "img1": chat("Describe it.", picture=1),
    "img2": chat("Describe it.", picture=2),
}


@pytest.fixture(scope="module")
def setup(checkpoint_factory):
    path = checkpoint_factory("qwen2_5_vl", "hf")

    def build():
        full = load(path)
        prepared = {}
        for name, messages in PROMPTS.items():
            prepared[name] = prepare_media_prompt(full, messages)
        return load(path, components=["language"]), prepared

    return mlx_thread.run_sync(build)


def engine_for(model, enabled: bool = True) -> DecoderEngine:
    cfg = EngineConfig(prefix=PrefixConfig(enabled=enabled, block_size=BS, num_blocks=256))
    engine = DecoderEngine(model, "vl", cfg, max_num_batched_tokens=32, max_num_seqs=4)
    engine.start()
    return engine


def request(engine: DecoderEngine, setup, name: str, tenant: str = "") -> EngineRequest:
    model, prepared = setup
    pads = [model.processor.image_token_id, model.processor.video_token_id]
    return media_request(engine, name, prepared[name], pads, max_tokens=12, tenant=tenant)


def common_blocks(setup, x: str, y: str) -> int:
    """Whole blocks `y` shares with `x`, as cached tokens (never y's last token)."""
    ids_x, ids_y = (setup[1][n][0].input_ids for n in (x, y))
    pairs = enumerate(zip(ids_x, ids_y, strict=False))
    same = next((i for i, (p, q) in pairs if p != q), min(len(ids_x), len(ids_y)))
    return min(same, len(ids_y) - 1) // BS * BS


@pytest.fixture(scope="module")
def reference(setup) -> dict[str, list[int]]:
    """Every prompt's tokens with APC off."""
    engine = engine_for(setup[0], enabled=False)
    try:
        out = {}
        for name in PROMPTS:
            out[name], finish = asyncio.run(collect(engine, request(engine, setup, name)))
            assert finish.cached_tokens == 0
        return out
    finally:
        engine.shutdown()


def test_a_shared_prefix_is_reused_and_the_tokens_do_not_change(setup, reference) -> None:
    engine = engine_for(setup[0])
    try:
        for name, expected_cached in (
            ("a", 0),
            ("b", common_blocks(setup, "a", "b")),  # the system prompt's whole blocks
            ("a", common_blocks(setup, "a", "a")),  # all but the last token, in whole blocks
        ):
            tokens, finish = asyncio.run(collect(engine, request(engine, setup, name)))
            assert tokens == reference[name], name
            assert finish.cached_tokens == expected_cached, name
        assert common_blocks(setup, "a", "b") >= 4 * BS  # the test means something
        c = engine.prefix.counters
        assert c.queries == 3 and c.matched_tokens == sum((0, *[
            common_blocks(setup, x, y) for x, y in (("a", "b"), ("a", "a"))
        ]))  # fmt: skip
    finally:
        engine.shutdown()


def test_a_different_image_stops_reuse_at_its_first_block(setup, reference) -> None:
    engine = engine_for(setup[0])
    try:
        first = asyncio.run(collect(engine, request(engine, setup, "img1")))
        second = asyncio.run(collect(engine, request(engine, setup, "img2")))
        again = asyncio.run(collect(engine, request(engine, setup, "img1")))
    finally:
        engine.shutdown()
    model, prepared = setup
    ids = np.asarray(prepared["img2"][0].input_ids)
    image_start = int(np.flatnonzero(ids == model.processor.image_token_id)[0])
    assert common_blocks(setup, "img1", "img2") > image_start  # same tokens past the image
    assert second[1].cached_tokens == image_start // BS * BS  # ... but no reuse past it
    assert again[1].cached_tokens == common_blocks(setup, "img1", "img1")
    assert first[0] == again[0] == reference["img1"] and second[0] == reference["img2"]


def test_tenants_never_share_blocks(setup, reference) -> None:
    engine = engine_for(setup[0])
    try:
        results = [
            asyncio.run(collect(engine, request(engine, setup, "a", tenant)))
            for tenant in ("alice", "bob", "alice")
        ]
    finally:
        engine.shutdown()
    assert [f.cached_tokens for _, f in results] == [0, 0, common_blocks(setup, "a", "a")]
    assert all(tokens == reference["a"] for tokens, _ in results)


def test_concurrent_requests_with_a_shared_prefix(setup, reference) -> None:
    """Hits and misses mixed in one batch, chunked prefill after the cached part."""
    engine = engine_for(setup[0])

    async def scenario() -> list[tuple[list[int], Finish]]:
        await collect(engine, request(engine, setup, "a"))  # warms the system prompt's blocks
        names = ["b", "img1", "a", "img2"]
        return await asyncio.gather(*(collect(engine, request(engine, setup, n)) for n in names))

    try:
        results = asyncio.run(scenario())
        assert engine.prefix.pool.pinned == 0  # every reference was released
    finally:
        engine.shutdown()
    for name, (tokens, finish) in zip(["b", "img1", "a", "img2"], results, strict=True):
        assert tokens == reference[name], name
        assert finish.cached_tokens >= common_blocks(setup, "a", name), name


def test_a_sliding_window_model_turns_apc_off_with_a_log_line(setup) -> None:
    model = setup[0]
    text = {**text_config(model.config), "use_sliding_window": True}
    config = {**model.config, "use_sliding_window": True, "text_config": text}
    sliding = dataclasses.replace(model, config=config)
    with capture_logs() as logs:
        prefix = PrefixCache(PrefixConfig(), sliding, kv_dtype(model))
    assert not prefix.enabled and prefix.keys([1] * 40, [], "") == []
    assert any(e["event"] == "apc_disabled" and "sliding" in e["reason"] for e in logs)
