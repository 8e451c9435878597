"""Qwen2-VL: how its parts are built from config.json."""

from __future__ import annotations

from shared.models.family_parts import from_text_config, from_vision_config, qwen_vl_family
from shared.models.qwen2_vl.embedder import QwenVLEmbedder
from shared.models.qwen2_vl.language import LanguageModel, TextArgs
from shared.models.qwen2_vl.processor import QwenVLProcessor
from shared.models.registry import Family

build_language = from_text_config(TextArgs, LanguageModel)


def family(model_type: str) -> Family:
    from shared.models.qwen2_vl.config import VisionArgs
    from shared.models.qwen2_vl.vision import VisionModel

    return qwen_vl_family(
        model_type,
        language=build_language,
        processor_cls=QwenVLProcessor,
        vision=from_vision_config(VisionArgs, VisionModel),
        embedder=lambda cfg: QwenVLEmbedder(cfg, timed_video=False),
    )
