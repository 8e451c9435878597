"""Gemma 3 in the batching decoder engine: slot-cache decode with the sliding window as a mask,
prefill chunks that would end inside an image, and APC, all token-exact (fp32, greedy) with
the in-process path that `test_gemma3_parity.py` checks against transformers.

The engine's prefill budget (24 tokens) cuts every prompt inside its image; the second
conversation reuses cached blocks that end inside the image (block size 16).
"""

from __future__ import annotations

import asyncio
import dataclasses

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from services.decoder.apc.prefix import PrefixConfig
from services.decoder.config import EngineConfig
from services.decoder.engine import DecoderEngine, EngineRequest
from shared.api import load
from shared.models.gemma3.embedder import image_blocks
from shared.runtime import mlx_thread
from shared.runtime.generate import stream_generate
from shared.runtime.sampling import SamplingParams
from shared.testing.gemma3_fixture import TOKEN_IDS, make_gemma3_checkpoint
from tests.engine_support import collect, media_request, prepare_media_prompt

BS = 16
MAX_TOKENS = 12
SYSTEM = "You are a careful assistant." + " Look." * 3  # puts a block boundary in the image
IMAGE_ID = TOKEN_IDS["<image_soft_token>"]


def image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 56, 3), np.uint8))


def chat(question: str, *pictures: int) -> list[dict]:
    parts = [{"type": "image", "image": image(p)} for p in pictures]
    parts.append({"type": "text", "text": question})
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": parts}]


PROMPTS = {
    "what": chat("What is in this picture?", 1),
    "describe": chat("Describe it in detail.", 1),
    "compare": chat("Compare the two pictures.", 1, 2),
    "story": [{"role": "user", "content": "Tell me a story about a robot who paints. " * 3}],
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = make_gemma3_checkpoint(tmp_path_factory.mktemp("gemma3") / "hf", "hf")

    def build():
        full = load(path)
        greedy = dataclasses.replace(full, eos_token_ids=frozenset())
        prepared, expected = {}, {}
        for name, messages in PROMPTS.items():
            prepared[name] = prepare_media_prompt(full, messages)
            chunks = stream_generate(
                greedy, prepared[name][0], max_tokens=MAX_TOKENS, sampling=SamplingParams()
            )
            expected[name] = [c.token for c in chunks]
        return load(path, components=["language"]), prepared, expected

    return mlx_thread.run_sync(build)


def engine_for(model, apc: bool) -> DecoderEngine:
    cfg = EngineConfig(prefix=PrefixConfig(enabled=apc, block_size=BS, num_blocks=256))
    engine = DecoderEngine(model, "gemma3", cfg, max_num_batched_tokens=24, max_num_seqs=4)
    engine.start()
    return engine


def request(engine: DecoderEngine, setup, name: str) -> EngineRequest:
    model, prepared, _ = setup
    pads = [model.processor.image_token_id]
    return media_request(engine, name, prepared[name], pads, max_tokens=MAX_TOKENS)


def test_concurrent_requests_match_the_in_process_path(setup) -> None:
    """Four rows of different lengths decode in one batch; each row's window is its own."""
    engine = engine_for(setup[0], apc=False)
    assert not engine.prefix.enabled

    async def scenario():
        return await asyncio.gather(*(collect(engine, request(engine, setup, n)) for n in PROMPTS))

    try:
        results = asyncio.run(scenario())
    finally:
        engine.shutdown()
    for name, (tokens, finish) in zip(PROMPTS, results, strict=True):
        assert finish.reason == "length", (name, finish.error)
        assert tokens == setup[2][name], name


def test_prefix_cache_reuse_ending_inside_an_image_is_exact(setup) -> None:
    engine = engine_for(setup[0], apc=True)
    assert engine.prefix.enabled  # the window is a mask over full KV: blocks are reusable
    try:
        first, _ = asyncio.run(collect(engine, request(engine, setup, "what")))
        second, finish = asyncio.run(collect(engine, request(engine, setup, "describe")))
    finally:
        engine.shutdown()
    ids = np.asarray(setup[1]["describe"][0].input_ids)
    _, [(start, end)] = image_blocks(ids == IMAGE_ID)
    assert start < finish.cached_tokens < end  # the reused prefix stops inside the image
    assert first == setup[2]["what"]
    assert second == setup[2]["describe"]


def test_batch_window_mask_for_several_tokens_per_row() -> None:
    """A speculative step (width 3): row i's query j sits at lengths[i] + j and sees keys
    k <= that position and > position - window, exactly as one-token steps would."""
    from shared.models.batch_cache import BatchKVCache, BatchLayout
    from shared.models.gemma3.config import FULL, SLIDING
    from shared.models.gemma3.masks import layer_masks

    layout, lengths, window = BatchLayout(), np.array([5, 9]), 4
    layout.begin(lengths, max_slots=4, width=3)
    masks = layer_masks(BatchKVCache(layout), 3, window, None)
    (full, first_full), (sliding, first_sliding) = masks[FULL], masks[SLIDING]
    span = layout.span  # 12 keys, padded to whole T_STEPs for wide steps
    assert first_full == first_sliding == 0 and sliding.shape == (2, 1, 3, span)
    for i, length in enumerate(lengths):
        for j in range(3):
            q = length + j
            keys = np.arange(span)
            assert np.array(full[i, 0, j]).tolist() == (keys <= q).tolist()
            assert (
                np.array(sliding[i, 0, j]).tolist() == ((keys <= q) & (keys > q - window)).tolist()
            )


def test_quantized_decode_cache_reads_every_stored_key() -> None:
    """With 8-bit KV (#7) a sliding layer attends through the cache's own `attend` over all
    it stores (no key skipping); the logits stay close to full precision."""
    from shared.models.gemma3.config import TextArgs
    from shared.models.gemma3.language import LanguageModel
    from shared.models.kv_quant import KVQuantConfig, decode_caches

    args = TextArgs(
        hidden_size=64, num_hidden_layers=3, intermediate_size=128, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, vocab_size=128, sliding_window=8,
        sliding_window_pattern=2, query_pre_attn_scalar=32,
    )  # fmt: skip
    mx.random.seed(0)
    lm = LanguageModel(args)
    ids = mx.array(np.random.default_rng(0).integers(0, 128, (1, 20)))
    plain, quant = lm.make_cache(), lm.make_cache()
    lm(ids, plain), lm(ids, quant)
    quant = decode_caches(quant, KVQuantConfig(bits=8, group_size=32))
    for token in (5, 9, 77):  # decode steps 20.. : past the window
        step = mx.array([[token]])
        a, b = np.array(lm(step, plain)[0, -1]), np.array(lm(step, quant)[0, -1])
        assert np.abs(a - b).max() / np.abs(a).max() < 5e-2
