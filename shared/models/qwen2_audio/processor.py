"""Qwen2-Audio processor: chat messages + audio -> ``ProcessedPrompt`` (torch-free).

Log-mel features are transformers' ``WhisperFeatureExtractor`` numpy path (its ``__call__``
would switch to torch whenever torch is importable), with the padding and frame count that
``Qwen2AudioProcessor`` asks of it: every clip padded (or cut) to ``chunk_length`` seconds, the
unpadded frame count kept. Each ``<|AUDIO|>`` is expanded on token ids to the clip's token
count, ``((frames - 1) // 2 + 1 - 2) // 2 + 1``, as ``Qwen2AudioProcessor`` expands it in text.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from shared.media.audio import load_audio
from shared.media.types import MediaInput, ProcessedPrompt
from shared.models.chat_messages import MediaRef
from shared.models.chat_processor import ChatProcessor, expand_placeholders, special_token_id
from shared.models.chat_template import template_file
from shared.models.qwen2_audio.config import output_tokens
from shared.models.qwen2_audio.messages import normalise_messages

AUDIO_TOKEN = "<|AUDIO|>"


class Qwen2AudioProcessor(ChatProcessor):
    modalities = ("text", "audio")

    def __init__(self, tokenizer: Any, feature_extractor: Any, chat_template: str | None) -> None:
        super().__init__(tokenizer, chat_template)
        self.feature_extractor = feature_extractor
        self.sampling_rate = int(feature_extractor.sampling_rate)
        self.audio_token_id = special_token_id(tokenizer, AUDIO_TOKEN, "Qwen2-Audio")

    @classmethod
    def from_pretrained(
        cls, path: str | Path, config: dict[str, Any] | None = None
    ) -> Qwen2AudioProcessor:
        from transformers import AutoTokenizer, WhisperFeatureExtractor

        folder = Path(path)
        if not (folder / "preprocessor_config.json").is_file():
            raise FileNotFoundError(f"{folder} has no preprocessor_config.json")
        return cls(
            AutoTokenizer.from_pretrained(str(folder)),
            WhisperFeatureExtractor.from_pretrained(str(folder)),
            template_file(folder),
        )

    # ---- audio ----------------------------------------------------------------------------

    def log_mel(self, samples: np.ndarray) -> tuple[np.ndarray, int]:
        """(mel bins, padded frames) float32 features and the unpadded frame count."""
        fe = self.feature_extractor
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)[: fe.n_samples]
        padded = np.zeros(fe.n_samples, dtype=np.float32)
        padded[: samples.size] = samples
        mel = fe._np_extract_fbank_features(padded[None], "cpu")[0]
        # The feature extractor's attention mask: every hop-th sample that is real audio.
        frames = min(math.ceil(samples.size / fe.hop_length), mel.shape[-1])
        return mel.astype(np.float32), frames

    def process_audio(self, samples: np.ndarray) -> MediaInput:
        """Mono float32 samples at ``sampling_rate`` -> MediaInput."""
        mel, frames = self.log_mel(samples)
        tokens = output_tokens(frames)
        if tokens < 1:
            raise ValueError(
                f"audio is too short ({samples.size} samples at {self.sampling_rate} Hz)"
            )
        return MediaInput("audio", mel[None], (frames,), tokens=tokens)

    def load_media(self, ref: MediaRef) -> MediaInput:
        if ref.modality != "audio":
            raise ValueError(f"this model does not accept {ref.modality} input")
        if isinstance(ref.source, np.ndarray):  # already decoded samples
            return self.process_audio(ref.source)
        # Only the first chunk_length seconds are ever read: decode no further.
        window = self.feature_extractor.n_samples / self.sampling_rate
        return self.process_audio(load_audio(ref.source, self.sampling_rate, keep_seconds=window))

    # ---- text -----------------------------------------------------------------------------

    def normalise(
        self, messages: list[dict[str, Any]]
    ) -> tuple[list[dict[str, Any]], list[MediaRef]]:
        return normalise_messages(messages)  # refuses parts other than text and audio

    def build_prompt(self, text: str, media: list[MediaInput]) -> ProcessedPrompt:
        """Tokenize a rendered prompt holding one ``<|AUDIO|>`` per clip, and expand them."""
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return ProcessedPrompt(input_ids=self.expand(ids, media), media=list(media))

    def expand(self, input_ids: Sequence[int], media: Sequence[MediaInput]) -> list[int]:
        return expand_placeholders(
            input_ids,
            media,
            [self.audio_token_id],
            _clip_tokens,
            placeholders="audio",
            items="clips",
        )


def _clip_tokens(slot: int, token: int, item: MediaInput) -> int:
    if item.modality != "audio":
        raise ValueError(f"this model does not accept {item.modality} input")
    return item.num_tokens(1)
