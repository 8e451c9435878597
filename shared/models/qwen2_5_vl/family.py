"""Qwen2.5-VL: Qwen2-VL's language side and processor, its own windowed vision tower."""

from __future__ import annotations

from shared.models.family_parts import from_vision_config, qwen_vl_family
from shared.models.qwen2_vl.embedder import QwenVLEmbedder
from shared.models.qwen2_vl.family import build_language
from shared.models.qwen2_vl.processor import QwenVLProcessor
from shared.models.registry import Family


def family(model_type: str) -> Family:
    from shared.models.qwen2_5_vl.config import VisionArgs
    from shared.models.qwen2_5_vl.vision import VisionModel

    return qwen_vl_family(
        model_type,
        language=build_language,
        processor_cls=QwenVLProcessor,
        vision=from_vision_config(VisionArgs, VisionModel),
        embedder=lambda cfg: QwenVLEmbedder(cfg, timed_video=True),
    )
