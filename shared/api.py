"""The in-process Python API: load a model, generate text, stream tokens.

from shared.api import load, generate, stream_generate

model = load("Qwen/Qwen2.5-VL-3B-Instruct")
print(generate(model, "Describe this image.", images=["cat.jpg"], max_tokens=64))
for chunk in stream_generate(model, "Write a haiku."):
    print(chunk.text, end="", flush=True)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from shared.media.types import ProcessedPrompt
from shared.models.kv_quant import KVQuantConfig
from shared.runtime import generate as _gen
from shared.runtime.generate import GenerationChunk
from shared.runtime.loaded import ALL_COMPONENTS, Component, LoadedModel, load_model
from shared.runtime.sampling import SamplingParams

__all__ = [
    "GenerationChunk",
    "LoadedModel",
    "SamplingParams",
    "build_messages",
    "generate",
    "load",
    "stream_generate",
]


def load(
    model: str | Path,
    *,
    dtype: str | None = None,
    components: Sequence[Component] = ALL_COMPONENTS,
    revision: str | None = None,
) -> LoadedModel:
    """Load a local folder or Hub id (Hugging Face or mlx-community layout)."""
    return load_model(model, components=components, dtype=dtype, revision=revision)


def build_messages(
    prompt: str,
    *,
    images: Sequence[Any] = (),
    videos: Sequence[Any] = (),
    system: str | None = None,
    audios: Sequence[Any] = (),
) -> list[dict[str, Any]]:
    """One user turn with media first, then text (the order Qwen's examples use)."""
    parts: list[dict[str, Any]] = [{"type": "image", "image": img} for img in images]
    parts += [{"type": "video", "video": vid} for vid in videos]
    parts += [{"type": "audio", "audio": clip} for clip in audios]
    parts.append({"type": "text", "text": prompt})
    messages: list[dict[str, Any]] = []
    if system:
        messages.append({"role": "system", "content": system})
    content: Any = parts if len(parts) > 1 else prompt
    messages.append({"role": "user", "content": content})
    return messages


def _prompt(
    model: LoadedModel,
    prompt: str | list[dict[str, Any]] | ProcessedPrompt,
    images: Sequence[Any],
    videos: Sequence[Any],
    system: str | None,
    audios: Sequence[Any] = (),
) -> ProcessedPrompt:
    if isinstance(prompt, ProcessedPrompt):
        return prompt
    messages = prompt if isinstance(prompt, list) else None
    if messages is None:
        messages = build_messages(
            prompt, images=images, videos=videos, system=system, audios=audios
        )
    return model.processor(messages)


def stream_generate(
    model: LoadedModel,
    prompt: str | list[dict[str, Any]] | ProcessedPrompt,
    *,
    images: Sequence[Any] = (),
    videos: Sequence[Any] = (),
    audios: Sequence[Any] = (),
    system: str | None = None,
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    seed: int | None = None,
    kv_quant: KVQuantConfig | None = None,
) -> Iterator[GenerationChunk]:
    """Yield text deltas as they are produced; the last chunk has `finish_reason` and stats.

    `prompt` is a user message string, a list of chat messages (OpenAI-style content parts),
    or an already processed prompt. `kv_quant`: quantize / window the decode KV cache.
    """
    params = SamplingParams(
        temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed
    )
    processed = _prompt(model, prompt, images, videos, system, audios)
    yield from _gen.stream_generate(
        model, processed, max_tokens=max_tokens, sampling=params, kv_quant=kv_quant
    )


def generate(model: LoadedModel, prompt: str | list[dict[str, Any]], **kwargs: Any) -> str:
    """The whole completion as one string; takes the keyword arguments of `stream_generate`."""
    return "".join(chunk.text for chunk in stream_generate(model, prompt, **kwargs))
