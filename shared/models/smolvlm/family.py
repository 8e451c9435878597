"""SmolVLM and Idefics3 (`smolvlm`, `idefics3`): how their parts are built from config.json."""

from __future__ import annotations

from typing import Any

from shared.loading.config import text_config
from shared.models.llama import ModelArgs
from shared.models.registry import Family
from shared.models.smolvlm.language import LanguageModel

MODALITIES = ("text", "image")


def build_language(config: dict[str, Any]) -> LanguageModel:
    # transformers builds the text model from `text_config` with Llama's defaults and the
    # VLM configs' rms_norm_eps of 1e-5.
    text = {"rms_norm_eps": 1e-5, **text_config(config)}
    return LanguageModel(ModelArgs.from_dict(text))


def build_vision(config: dict[str, Any]) -> Any:
    from shared.models.smolvlm.config import TowerArgs
    from shared.models.smolvlm.vision import VisionModel

    return VisionModel(TowerArgs.from_config(config))


def family(model_type: str) -> Family:
    from shared.models.smolvlm.embedder import SmolVLMEmbedder
    from shared.models.smolvlm.processor import SmolVLMProcessor

    return Family(
        name=model_type,
        modalities=MODALITIES,
        language=build_language,
        processor=SmolVLMProcessor.from_pretrained,
        vision=build_vision,
        embedder=SmolVLMEmbedder,
    )
