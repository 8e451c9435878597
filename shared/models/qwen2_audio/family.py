"""Qwen2-Audio: how its parts are built from config.json. The audio tower fills the `vision`
slot (the encoder service's half: media in, LM embeddings out)."""

from __future__ import annotations

from typing import Any

from shared.models import qwen2
from shared.models.base import LanguageModel
from shared.models.qwen2_audio.config import language_config
from shared.models.registry import Family

MODALITIES = ("text", "audio")


def build_language(config: dict[str, Any]) -> LanguageModel:
    return qwen2.Model(qwen2.ModelArgs.from_dict(language_config(config)))


def family(model_type: str) -> Family:
    from shared.models.qwen2_audio.audio import AudioTower
    from shared.models.qwen2_audio.config import audio_args
    from shared.models.qwen2_audio.embedder import AudioEmbedder
    from shared.models.qwen2_audio.processor import Qwen2AudioProcessor

    return Family(
        name=model_type,
        modalities=MODALITIES,
        language=build_language,
        processor=Qwen2AudioProcessor.from_pretrained,
        vision=lambda cfg: AudioTower(audio_args(cfg)),
        embedder=AudioEmbedder,
    )
