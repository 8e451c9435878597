"""One request through the batched engine with a drafter: what `prism generate --draft-*`
runs (speculation lives in the engine; `shared.api` decodes without it)."""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from services.decoder.engine import DecoderEngine, Delta, EngineRequest
from shared.api import build_messages, load
from shared.runtime import mlx_thread
from shared.runtime.generate import encode_media
from shared.runtime.sampling import SamplingParams


@dataclass
class SpecReport:
    prompt_tokens: int
    generation_tokens: int
    generation_tps: float
    acceptance: float  # accepted / drafted tokens
    tokens_per_step: float  # per target forward pass, over the steps that drafted
    drafted: int
    accepted: int
    finish_reason: str


def speculative_generate(
    model_path: str,
    prompt: str,
    *,
    images: list[Any] | None = None,
    system: str | None = None,
    max_tokens: int = 256,
    sampling: SamplingParams | None = None,
    draft_kind: str = "",
    draft_model: str = "",
    num_draft_tokens: int = 4,
    dtype: str | None = None,
) -> Iterator[str | SpecReport]:
    """Yield the text as it comes, then one SpecReport."""
    messages = build_messages(prompt, images=images or [], system=system)

    def prepare() -> tuple:
        model = load(model_path, dtype=dtype)
        processed = model.processor(messages)
        features = encode_media(model, processed.media) if processed.media else []
        mx.eval([f.tensors() for f in features])
        return model, processed, features

    model, processed, features = mlx_thread.run_sync(prepare)
    engine = DecoderEngine(
        model, "generate", max_num_seqs=1, draft_kind=draft_kind or None,
        draft_model=draft_model or None, num_draft_tokens=num_draft_tokens,
    )  # fmt: skip
    request = EngineRequest(
        "generate", processed, list(features), sampling or SamplingParams(),
        max_tokens=max_tokens,
    )  # fmt: skip
    engine.start()
    events: queue.SimpleQueue = queue.SimpleQueue()
    reader = threading.Thread(target=lambda: asyncio.run(_pump(engine, request, events)))
    reader.start()  # the events stream while the engine runs; this thread prints them
    finish = None
    try:
        while finish is None:
            event = events.get()
            if isinstance(event, BaseException):
                raise event
            if isinstance(event, Delta):
                yield event.text
            else:
                finish = event
    finally:
        reader.join()
        engine.shutdown()
    assert finish is not None
    spec = engine.core.spec
    seconds = finish.timings.decode_ns / 1e9
    yield SpecReport(
        finish.prompt_tokens, finish.completion_tokens,
        (finish.completion_tokens - 1) / seconds if seconds > 0 else 0.0,
        spec.acceptance, spec.tokens_per_step, spec.drafted, spec.accepted, finish.reason,
    )  # fmt: skip


async def _pump(engine: DecoderEngine, request: EngineRequest, out: queue.SimpleQueue) -> None:
    try:
        async for event in engine.submit(request):
            out.put(event)
    except Exception as exc:  # noqa: BLE001 - handed to the caller's thread
        out.put(exc)
