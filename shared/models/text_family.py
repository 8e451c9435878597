"""Text-only decoders (Llama 3.x, Qwen2/2.5, Qwen3): served for text and used as drafters."""

from __future__ import annotations

import importlib
from typing import Any

from shared.loading.config import text_config
from shared.models.base import LanguageModel
from shared.models.registry import Family
from shared.models.text_processor import TextProcessor

_MODULES = {
    "llama": "shared.models.llama",
    "qwen2": "shared.models.qwen2",
    "qwen3": "shared.models.qwen3",
}


def family(model_type: str) -> Family:
    module = importlib.import_module(_MODULES[model_type])

    def build_language(config: dict[str, Any]) -> LanguageModel:
        return module.Model(module.ModelArgs.from_dict(text_config(config)))

    return Family(
        name=model_type,
        modalities=TextProcessor.modalities,
        language=build_language,
        processor=TextProcessor.from_pretrained,
    )
