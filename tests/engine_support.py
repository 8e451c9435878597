"""Driving the decoder's batching engine from tests: one request's tokens and finish, several
requests run together, and requests over prepared media prompts (features and content keys as
the encoder gives them) with their prefix-cache keys."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import mlx.core as mx
import numpy as np

from services.decoder.apc.hashing import media_spans
from services.decoder.engine import DecoderEngine, Delta, EngineRequest, Finish
from shared.runtime.generate import encode_media


async def collect(engine: DecoderEngine, req: EngineRequest) -> tuple[list[int], Finish]:
    """Every token `req` streams, and the Finish that ends it."""
    tokens: list[int] = []
    async for event in engine.submit(req):
        if isinstance(event, Delta):
            tokens += event.token_ids
        else:
            return tokens, event
    raise AssertionError("no Finish")


def prepare_media_prompt(full: Any, messages: list[dict]) -> tuple[Any, list[Any], list[str]]:
    """What the encoder hands the decoder for `messages` on a fully loaded model: the prompt,
    its media features (evaluated) and a content key per item (a hash of its features)."""
    prompt = full.processor(messages)
    features = encode_media(full, prompt.media)
    mx.eval([f.tensors() for f in features])
    keys = [hashlib.sha256(np.asarray(f.features).tobytes()).hexdigest() for f in features]
    return prompt, features, keys


def media_request(
    engine: DecoderEngine,
    name: str,
    prepared: tuple[Any, list[Any], list[str]],
    pads: list[int],
    *,
    max_tokens: int,
    tenant: str = "",
) -> EngineRequest:
    """A greedy request (EOS ignored: always `max_tokens`) for a prepared (prompt, features,
    content keys) entry, with the prefix-cache keys the servicer would give it: media spans
    found at the `pads` placeholder ids."""
    prompt, features, content_keys = prepared
    items = [(k, f.rows) for k, f in zip(content_keys, features, strict=True)]
    spans = media_spans(prompt.input_ids, pads, items)
    return EngineRequest(
        name, prompt, features, max_tokens=max_tokens, ignore_eos=True,
        prefix_keys=engine.prefix.keys(prompt.input_ids, spans, tenant),
    )  # fmt: skip


async def concurrent_tokens(
    engine: DecoderEngine, requests: list[EngineRequest]
) -> list[list[int]]:
    """Submit every request at once (so they share batches), then read each one's tokens."""
    handles = [engine.submit(r) for r in requests]
    outs = []
    for h in handles:
        outs.append([t async for e in h if isinstance(e, Delta) for t in e.token_ids])
    return outs


def start_and_run(engine: DecoderEngine, requests: list[EngineRequest]) -> list[list[int]]:
    """Start `engine`, run `requests` concurrently to the end, and always shut it down."""
    engine.start()
    try:
        return asyncio.run(concurrent_tokens(engine, requests))
    finally:
        engine.shutdown()
