"""Qwen2.5-VL: Qwen2-VL's language side and processor, its own windowed vision tower."""

from __future__ import annotations

from shared.loading.config import vision_config
from shared.models.qwen2_vl.embedder import QwenVLEmbedder
from shared.models.qwen2_vl.family import MODALITIES, build_language
from shared.models.qwen2_vl.processor import QwenVLProcessor
from shared.models.registry import Family


def family(model_type: str) -> Family:
    from shared.models.qwen2_5_vl.config import VisionArgs
    from shared.models.qwen2_5_vl.vision import VisionModel

    return Family(
        name=model_type,
        modalities=MODALITIES,
        language=build_language,
        processor=lambda path, _cfg: QwenVLProcessor.from_pretrained(path),
        vision=lambda cfg: VisionModel(VisionArgs.from_dict(vision_config(cfg))),
        embedder=lambda cfg: QwenVLEmbedder(cfg, timed_video=True),
    )
