"""Load a checkpoint into its parts. The vision and language halves load independently so an
encoder process never materialises language weights and a decoder never materialises vision ones.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import mlx.core as mx

from shared import cpu_blas
from shared.loading import weights as W
from shared.loading.config import eos_token_ids, load_config, quantization
from shared.loading.hub import resolve_model_path
from shared.models.base import LanguageModel, VisionTower
from shared.models.registry import Family, Processor, PromptEmbedder, family_for

Component = Literal["vision", "language"]
ALL_COMPONENTS: tuple[Component, ...] = ("vision", "language")

_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


@dataclass
class LoadedModel:
    path: Path
    config: dict[str, Any]
    family: Family
    processor: Processor
    language: LanguageModel | None = None
    vision: VisionTower | None = None
    embedder: PromptEmbedder | None = None
    eos_token_ids: frozenset[int] = frozenset()

    @property
    def is_multimodal(self) -> bool:
        return self.family.vision is not None

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer


def parse_dtype(name: str | None) -> mx.Dtype | None:
    """The weights' dtype to cast to; None (no `--dtype`) means `auto_dtype()`."""
    if name is None:
        return auto_dtype()
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


def auto_dtype() -> mx.Dtype | None:
    """As stored (None), except float32 on the CPU backend when it has a fast BLAS: there
    MLX's half-precision matmuls run ~16x slower than MKL's sgemm (`shared.cpu_blas`)."""
    on_cpu = mx.default_device() == mx.cpu
    return mx.float32 if on_cpu and cpu_blas.active() else None


def load_model(
    model: str | Path,
    *,
    components: Collection[Component] = ALL_COMPONENTS,
    dtype: str | None = None,
    revision: str | None = None,
) -> LoadedModel:
    path = resolve_model_path(model, revision)
    config = load_config(path)
    family = family_for(config)
    quant = quantization(config)
    cast = parse_dtype(dtype)
    all_weights = W.read_weights(path)  # lazy: only what a module keeps is ever read
    loaded = LoadedModel(
        path=path,
        config=config,
        family=family,
        processor=family.processor(path, config),
        eos_token_ids=frozenset(eos_token_ids(path, config)),
    )
    if family.vision is None:
        if "language" in components:
            lm = family.language(config)
            weights = W.cast_floats(W.canonical_text_names(all_weights), cast)
            loaded.language = W.load_module(lm, weights, quant, lm.sanitize)
        return loaded

    canonical = W.canonical_vlm_names(all_weights)
    del all_weights
    if "vision" in components:
        tower = family.vision(config)
        weights = W.cast_floats(W.take_prefix(canonical, W.VISION_PREFIX), cast)
        loaded.vision = W.load_module(tower, weights, quant, tower.sanitize)
    if "language" in components:
        lm = family.language(config)
        weights = W.cast_floats(W.take_prefix(canonical, W.LANGUAGE_PREFIX), cast)
        loaded.language = W.load_module(lm, weights, quant, lm.sanitize)
        loaded.embedder = family.embedder(config) if family.embedder else None
    return loaded
