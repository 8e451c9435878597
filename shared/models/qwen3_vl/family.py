"""Qwen3-VL: how its parts are built from config.json."""

from __future__ import annotations

from shared.models.family_parts import from_text_config, from_vision_config, qwen_vl_family
from shared.models.qwen3_vl.config import TextArgs
from shared.models.qwen3_vl.embedder import Qwen3VLEmbedder
from shared.models.qwen3_vl.language import LanguageModel
from shared.models.qwen3_vl.processor import Qwen3VLProcessor
from shared.models.registry import Family

build_language = from_text_config(TextArgs, LanguageModel)


def family(model_type: str) -> Family:
    from shared.models.qwen3_vl.config import VisionArgs
    from shared.models.qwen3_vl.vision import VisionModel

    return qwen_vl_family(
        model_type,
        language=build_language,
        processor_cls=Qwen3VLProcessor,
        vision=from_vision_config(VisionArgs, VisionModel),
        embedder=Qwen3VLEmbedder,
    )
