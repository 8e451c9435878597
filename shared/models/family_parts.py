"""Builders several `Family` entries share: a model part made from one sub-config read into
its args dataclass, and the Qwen-VL families' common layout (same modalities, a processor
loaded from the checkpoint directory alone, a vision tower from `vision_config`).

Vision classes are passed in rather than imported here so that each family module keeps its
vision imports inside `family()` (a text-only server never loads them).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from shared.loading.config import text_config, vision_config
from shared.models.registry import Family, Processor, PromptEmbedder

Builder = Callable[[dict[str, Any]], Any]

QWEN_VL_MODALITIES = ("text", "image", "video")


def from_text_config(args_cls: Any, model_cls: Callable[[Any], Any]) -> Builder:
    """config.json -> `model_cls(args_cls.from_dict(text_config(config)))`."""

    def build(config: dict[str, Any]) -> Any:
        return model_cls(args_cls.from_dict(text_config(config)))

    return build


def from_vision_config(args_cls: Any, model_cls: Callable[[Any], Any]) -> Builder:
    """config.json -> `model_cls(args_cls.from_dict(vision_config(config)))`."""

    def build(config: dict[str, Any]) -> Any:
        return model_cls(args_cls.from_dict(vision_config(config)))

    return build


def qwen_vl_family(
    model_type: str,
    *,
    language: Builder,
    processor_cls: Any,
    vision: Builder,
    embedder: Callable[[dict[str, Any]], PromptEmbedder],
) -> Family:
    """A Qwen2-VL / Qwen2.5-VL / Qwen3-VL entry; they differ only in the parts passed in."""

    def processor(path: Path, _config: dict[str, Any]) -> Processor:
        return processor_cls.from_pretrained(path)

    return Family(
        name=model_type,
        modalities=QWEN_VL_MODALITIES,
        language=language,
        processor=processor,
        vision=vision,
        embedder=embedder,
    )
