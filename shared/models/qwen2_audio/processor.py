"""Qwen2-Audio processor: chat messages + audio -> ``ProcessedPrompt`` (torch-free).

Log-mel features are transformers' ``WhisperFeatureExtractor`` numpy path (its ``__call__``
would switch to torch whenever torch is importable), with the padding and frame count that
``Qwen2AudioProcessor`` asks of it: every clip padded (or cut) to ``chunk_length`` seconds, the
unpadded frame count kept. Each ``<|AUDIO|>`` is expanded on token ids to the clip's token
count, ``((frames - 1) // 2 + 1 - 2) // 2 + 1``, as ``Qwen2AudioProcessor`` expands it in text.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from shared.media.audio import load_audio
from shared.media.types import MediaInput, ProcessedPrompt
from shared.models.qwen2_audio.config import output_tokens
from shared.models.qwen2_audio.messages import normalise_messages
from shared.models.qwen2_vl.messages import MediaRef

AUDIO_TOKEN = "<|AUDIO|>"


class Qwen2AudioProcessor:
    modalities = ("text", "audio")

    def __init__(self, tokenizer: Any, feature_extractor: Any, chat_template: str | None) -> None:
        self.tokenizer = tokenizer
        self.feature_extractor = feature_extractor
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        self.sampling_rate = int(feature_extractor.sampling_rate)
        token_id = tokenizer.convert_tokens_to_ids(AUDIO_TOKEN)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no {AUDIO_TOKEN} token; is this Qwen2-Audio?")
        self.audio_token_id = int(token_id)

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
            _template_file(folder),
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

    def render(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **template_kwargs: Any,
    ) -> str:
        if self.chat_template is None:
            raise ValueError("this checkpoint has no chat template")
        normalised, _ = normalise_messages(messages)
        if tools is not None:
            template_kwargs["tools"] = tools
        return self.tokenizer.apply_chat_template(
            normalised,
            chat_template=self.chat_template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            **template_kwargs,
        )

    def __call__(self, messages: list[dict[str, Any]], **kwargs: Any) -> ProcessedPrompt:
        _, refs = normalise_messages(messages)
        text = self.render(messages, **kwargs)
        return self.build_prompt(text, [self.load_media(ref) for ref in refs])

    def build_prompt(self, text: str, media: list[MediaInput]) -> ProcessedPrompt:
        """Tokenize a rendered prompt holding one ``<|AUDIO|>`` per clip, and expand them."""
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return ProcessedPrompt(input_ids=self.expand(ids, media), media=list(media))

    def expand(self, input_ids: Sequence[int], media: Sequence[MediaInput]) -> list[int]:
        ids = np.asarray(input_ids, dtype=np.int64)
        slots = np.flatnonzero(ids == self.audio_token_id)
        if len(slots) != len(media):
            raise ValueError(f"prompt has {len(slots)} audio placeholders, got {len(media)} clips")
        repeats = np.ones(len(ids), dtype=np.int64)
        for slot, item in zip(slots.tolist(), media, strict=True):
            if item.modality != "audio":
                raise ValueError(f"this model does not accept {item.modality} input")
            repeats[slot] = item.num_tokens(1)
        return np.repeat(ids, repeats).tolist()


def _template_file(folder: Path) -> str | None:
    """The processor-level chat template, when the tokenizer files do not carry one."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    as_json = folder / "chat_template.json"
    if as_json.is_file():
        return json.loads(as_json.read_text()).get("chat_template")
    return None
