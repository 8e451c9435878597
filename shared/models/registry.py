"""Which code serves which checkpoint: config.json's `model_type` -> a model family."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import mlx.core as mx
import numpy as np

from shared.media.types import MediaInput, ProcessedPrompt
from shared.models.base import LanguageModel, MediaFeatures, VisionTower


class Processor(Protocol):
    """Chat messages (OpenAI-style parts) -> token ids with expanded placeholders and media."""

    tokenizer: Any

    def __call__(self, messages: list[dict[str, Any]], **kwargs: Any) -> ProcessedPrompt: ...


@dataclass
class PrefillInputs:
    """What the language model's first forward pass needs beyond token ids."""

    input_ids: mx.array  # (1, L)
    input_embeddings: mx.array | None = None  # (1, L, D) when media features are merged
    position_ids: mx.array | None = None  # (3, 1, L) for M-RoPE prompts with media
    rope_delta: int = 0  # decode position = cache offset + rope_delta
    # More per-prompt-token tensors, sequence on axis 1 (e.g. Qwen3-VL's DeepStack embeddings
    # (levels, L, D)): each prefill chunk gets [:, start:end] as a keyword argument of the LM.
    extras: dict[str, mx.array] = field(default_factory=dict)
    # [start, end) prompt spans a prefill chunk must not end inside: Gemma 3's image tokens
    # attend to their whole image, so an image's KV needs all of it in one forward pass.
    atomic_spans: list[tuple[int, int]] = field(default_factory=list)

    def chunk_end(self, end: int) -> int:
        """`end` moved to the end of the atomic span it would cut, if any."""
        for start, stop in self.atomic_spans:
            if start < end < stop:
                return stop
        return end


class PromptEmbedder(Protocol):
    """Merges media features into the language model's inputs (the decoder-side half of a VLM)."""

    def __call__(
        self,
        language: LanguageModel,
        input_ids: np.ndarray,
        media: list[MediaInput],
        features: list[MediaFeatures],
    ) -> PrefillInputs: ...


@dataclass(frozen=True)
class Family:
    name: str
    modalities: tuple[str, ...]
    language: Callable[[dict[str, Any]], LanguageModel]
    processor: Callable[[Path, dict[str, Any]], Processor]
    vision: Callable[[dict[str, Any]], VisionTower] | None = None
    embedder: Callable[[dict[str, Any]], PromptEmbedder] | None = None


# model_type -> module exporting FAMILY; imported lazily so a text server never imports vision code.
_FAMILIES = {
    "qwen2_vl": "shared.models.qwen2_vl.family",
    "qwen2_5_vl": "shared.models.qwen2_5_vl.family",
    "qwen3_vl": "shared.models.qwen3_vl.family",
    "qwen2_audio": "shared.models.qwen2_audio.family",
    "gemma3": "shared.models.gemma3.family",
    "gemma3_text": "shared.models.gemma3.family",
    "smolvlm": "shared.models.smolvlm.family",
    "idefics3": "shared.models.smolvlm.family",
    "qwen2": "shared.models.text_family",
    "qwen3": "shared.models.text_family",
    "llama": "shared.models.text_family",
}


class UnsupportedModelError(ValueError):
    pass


def supported_model_types() -> list[str]:
    return sorted(_FAMILIES)


def family_for(config: dict[str, Any]) -> Family:
    model_type = config.get("model_type")
    if model_type not in _FAMILIES:
        arch = ",".join(config.get("architectures") or []) or "unknown"
        raise UnsupportedModelError(
            f"unsupported model_type {model_type!r} (architectures: {arch}); "
            f"supported: {', '.join(supported_model_types())}"
        )
    module = importlib.import_module(_FAMILIES[model_type])
    return module.family(model_type)
