"""Gemma 3 (image + text, `gemma3`) and its text-only sibling (`gemma3_text`)."""

from __future__ import annotations

from typing import Any

from shared.loading.config import text_config, vision_config
from shared.models.gemma3.language import LanguageModel
from shared.models.registry import Family
from shared.models.text_processor import TextProcessor


def build_language(config: dict[str, Any]) -> LanguageModel:
    from shared.models.gemma3.config import TextArgs

    args = TextArgs.from_dict(text_config(config))
    if config.get("model_type") == "gemma3":
        # transformers' Gemma3ForConditionalGeneration never soft-caps its logits (only the
        # text-only Gemma3ForCausalLM does); published configs leave it null anyway.
        args.final_logit_softcapping = None
    return LanguageModel(args)


def build_vision(config: dict[str, Any]) -> Any:
    from shared.models.gemma3.config import ProjectorArgs, VisionArgs
    from shared.models.gemma3.vision import VisionModel

    args = ProjectorArgs(
        vision=VisionArgs.from_dict(vision_config(config)),
        text_hidden_size=int(text_config(config).get("hidden_size", 2304)),
        mm_tokens_per_image=int(config.get("mm_tokens_per_image") or 256),
    )
    return VisionModel(args)


def family(model_type: str) -> Family:
    if model_type == "gemma3_text":
        return Family(
            name=model_type,
            modalities=TextProcessor.modalities,
            language=build_language,
            processor=TextProcessor.from_pretrained,
        )
    from shared.models.gemma3.embedder import Gemma3Embedder
    from shared.models.gemma3.processor import Gemma3Processor

    return Family(
        name=model_type,
        modalities=Gemma3Processor.modalities,
        language=build_language,
        processor=Gemma3Processor.from_pretrained,
        vision=build_vision,
        embedder=Gemma3Embedder,
    )
