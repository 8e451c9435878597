"""Single-sequence generation: encode media, prefill in chunks, decode with the step pipelined.

This is the in-process path (`prism generate`, `shared.api`); the batching engine of the
decoder service builds on the same model interfaces.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from shared.media.types import MediaInput, ProcessedPrompt
from shared.models.base import LanguageModel, MediaFeatures
from shared.models.kv_quant import KVQuantConfig, decode_caches
from shared.models.registry import PrefillInputs
from shared.runtime.detokenizer import StreamingDetokenizer
from shared.runtime.loaded import LoadedModel
from shared.runtime.sampling import Sampler, SamplingParams

PREFILL_STEP = 2048


@dataclass
class GenerationChunk:
    text: str
    token: int | None
    finish_reason: str | None = None  # "stop" | "length" on the last chunk
    prompt_tokens: int = 0
    generation_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tps: float = 0.0
    peak_memory_gb: float = 0.0


def encode_media(model: LoadedModel, media: list[MediaInput]) -> list[MediaFeatures]:
    """Vision features per media item, in order (one tower call for all of them)."""
    if not media:
        return []
    if model.vision is None:
        raise ValueError("this model was loaded without its vision tower")
    pixels = mx.array(np.concatenate([m.pixel_values for m in media], axis=0))
    grids = mx.array(np.array([m.grid_thw for m in media], dtype=np.int32))
    out = model.vision(pixels, grids)
    batched = out if isinstance(out, MediaFeatures) else MediaFeatures(out)
    return batched.split([m.num_tokens(_merge_size(model)) for m in media])


def _merge_size(model: LoadedModel) -> int:
    # Patches per token side, as the decoder's prompt builder reads it: from the processor
    # (Gemma 3: its pooling kernel), else the Qwen-VL config's spatial_merge_size.
    merge = getattr(model.processor, "merge_size", None)
    if merge:
        return int(merge)
    return int(model.config.get("vision_config", {}).get("spatial_merge_size", 2))


def prepare_inputs(
    model: LoadedModel, prompt: ProcessedPrompt, features: list[MediaFeatures]
) -> PrefillInputs:
    if model.embedder is None:
        if prompt.media:
            raise ValueError("this model does not accept media input")
        return PrefillInputs(input_ids=mx.array([prompt.input_ids], dtype=mx.int32))
    return model.embedder(model.language, np.array(prompt.input_ids), prompt.media, features)


def _decode_positions(offset: int, delta: int) -> mx.array:
    # (B, 1): all three M-RoPE rows are equal after the prompt, which is plain 1-D rotary.
    return mx.full((1, 1), offset + delta, dtype=mx.int32)


def forward_span(
    lm: LanguageModel, inputs: PrefillInputs, cache: list, start: int, end: int
) -> mx.array:
    """The model on prompt positions [start, end), appending their KV to `cache`.

    Each of `inputs.extras` (sequence on axis 1) goes to the LM as a keyword argument, cut to
    the same span, so chunked prefill and prefix-cache hits see the rows of their own tokens.
    """
    emb, pos = inputs.input_embeddings, inputs.position_ids
    extras = {name: value[:, start:end] for name, value in inputs.extras.items()}
    return lm(
        inputs.input_ids[:, start:end],
        cache,
        input_embeddings=None if emb is None else emb[:, start:end],
        position_ids=None if pos is None else pos[..., start:end],
        **extras,
    )


def prefill(lm: LanguageModel, inputs: PrefillInputs, cache: list) -> mx.array:
    """Run the prompt through the model in chunks; return the last position's logits (1, V).

    Every token but the last only fills the KV cache: evaluating just the cache state lets MLX
    skip the last layer's output path, the final norm and the LM head for those positions
    (logits for a 2048-token chunk of a 152k vocabulary would be ~0.6 GB never read). The last
    token then runs alone.
    """
    last = inputs.input_ids.shape[1] - 1
    start = 0
    while start < last:
        # A chunk never ends inside an image whose tokens attend to each other (Gemma 3).
        end = min(inputs.chunk_end(min(start + PREFILL_STEP, last)), last)
        forward_span(lm, inputs, cache, start, end)
        mx.eval([c.state for c in cache])
        start = end
    return forward_span(lm, inputs, cache, last, last + 1)[:, -1, :]


def stream_generate(
    model: LoadedModel,
    prompt: ProcessedPrompt,
    *,
    max_tokens: int = 256,
    sampling: SamplingParams | None = None,
    stop_token_ids: set[int] | None = None,
    kv_quant: KVQuantConfig | None = None,
) -> Iterator[GenerationChunk]:
    lm = model.language
    if lm is None:
        raise ValueError("this model was loaded without its language model")
    sampler = Sampler(sampling or SamplingParams())
    stops = set(model.eos_token_ids) | set(stop_token_ids or ())
    detok = StreamingDetokenizer(model.tokenizer)
    mx.reset_peak_memory()

    tic = time.perf_counter()
    features = encode_media(model, prompt.media)
    inputs = prepare_inputs(model, prompt, features)
    cache = lm.make_cache()
    delta = inputs.rope_delta
    y = sampler(prefill(lm, inputs, cache))
    # The prompt prefills at full precision; decoding reads the quantized / windowed copy.
    cache = decode_caches(cache, kv_quant or KVQuantConfig())
    mx.async_eval(y)

    def step(token: mx.array) -> mx.array:
        positions = _decode_positions(cache[0].offset, delta) if delta else None
        return sampler(lm(token[:, None], cache, position_ids=positions)[:, -1, :])

    n_prompt = len(prompt.input_ids)
    prompt_time = gen_start = 0.0
    n = 0
    while True:
        next_y = step(y) if n + 1 < max_tokens else None
        if next_y is not None:
            mx.async_eval(next_y)  # queue step n+1 before the host reads token n
        token = int(y.item())
        if n == 0:
            prompt_time = time.perf_counter() - tic
            gen_start = time.perf_counter()
        n += 1
        finish = "stop" if token in stops else ("length" if n >= max_tokens else None)
        text = "" if token in stops else detok.add(token)
        if finish:
            text += detok.flush()
        elapsed = max(time.perf_counter() - gen_start, 1e-9)
        yield GenerationChunk(
            text=text,
            token=token,
            finish_reason=finish,
            prompt_tokens=n_prompt,
            generation_tokens=n,
            prompt_tps=n_prompt / max(prompt_time, 1e-9),
            generation_tps=(n - 1) / elapsed if n > 1 else 0.0,
            peak_memory_gb=mx.get_peak_memory() / 1e9,
        )
        if finish:
            return
        y = next_y
