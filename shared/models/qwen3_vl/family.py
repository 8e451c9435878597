"""Qwen3-VL: how its parts are built from config.json."""

from __future__ import annotations

from typing import Any

from shared.loading.config import text_config, vision_config
from shared.models.qwen3_vl.config import TextArgs
from shared.models.qwen3_vl.embedder import Qwen3VLEmbedder
from shared.models.qwen3_vl.language import LanguageModel
from shared.models.qwen3_vl.processor import Qwen3VLProcessor
from shared.models.registry import Family

MODALITIES = ("text", "image", "video")


def build_language(config: dict[str, Any]) -> LanguageModel:
    return LanguageModel(TextArgs.from_dict(text_config(config)))


def family(model_type: str) -> Family:
    from shared.models.qwen3_vl.config import VisionArgs
    from shared.models.qwen3_vl.vision import VisionModel

    return Family(
        name=model_type,
        modalities=MODALITIES,
        language=build_language,
        processor=lambda path, _cfg: Qwen3VLProcessor.from_pretrained(path),
        vision=lambda cfg: VisionModel(VisionArgs.from_dict(vision_config(cfg))),
        embedder=Qwen3VLEmbedder,
    )
