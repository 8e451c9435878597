"""Qwen2-VL: how its parts are built from config.json."""

from __future__ import annotations

from typing import Any

from shared.loading.config import text_config, vision_config
from shared.models.qwen2_vl.embedder import QwenVLEmbedder
from shared.models.qwen2_vl.language import LanguageModel, TextArgs
from shared.models.qwen2_vl.processor import QwenVLProcessor
from shared.models.registry import Family

MODALITIES = ("text", "image", "video")


def build_language(config: dict[str, Any]) -> LanguageModel:
    return LanguageModel(TextArgs.from_dict(text_config(config)))


def family(model_type: str) -> Family:
    from shared.models.qwen2_vl.config import VisionArgs
    from shared.models.qwen2_vl.vision import VisionModel

    return Family(
        name=model_type,
        modalities=MODALITIES,
        language=build_language,
        processor=lambda path, _cfg: QwenVLProcessor.from_pretrained(path),
        vision=lambda cfg: VisionModel(VisionArgs.from_dict(vision_config(cfg))),
        embedder=lambda cfg: QwenVLEmbedder(cfg, timed_video=False),
    )
