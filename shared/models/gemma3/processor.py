"""Gemma 3 processor: chat messages + images -> ``ProcessedPrompt`` (torch-free).

As transformers' ``Gemma3Processor``: the chat template writes ``<start_of_image>`` per image;
each is replaced in the text by ``\\n\\n<start_of_image>`` + ``<image_soft_token>`` x
``mm_tokens_per_image`` + ``<end_of_image>\\n\\n`` (with pan-and-scan: the original image and
its crops, each so expanded, in transformers' words) and the text is then tokenized whole, so
the newlines merge with their neighbours exactly as there. Pixels come from transformers'
numpy/PIL ``Gemma3ImageProcessorPil`` (resize to the tower's square, rescale, normalise; pan-
and-scan when preprocessor_config.json turns it on, off by default).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

from shared.loading.config import vision_config
from shared.media.image import ImageSource, load_image
from shared.media.types import MediaInput, ProcessedPrompt
from shared.models.chat_messages import MediaRef, refuse_unaccepted
from shared.models.chat_processor import ChatProcessor, replace_markers, special_token_id
from shared.models.chat_template import template_file

BOI, EOI, IMAGE = "<start_of_image>", "<end_of_image>", "<image_soft_token>"


class Gemma3Processor(ChatProcessor):
    modalities = ("text", "image")

    def __init__(
        self,
        tokenizer: Any,
        image_processor: Gemma3ImageProcessorPil,
        *,
        mm_tokens_per_image: int,
        patches_per_side: int,
        chat_template: str | None = None,
    ) -> None:
        super().__init__(tokenizer, chat_template)
        self.image_processor = image_processor
        self.image_token_id = self._token_id(IMAGE)
        self.boi_token_id, self.eoi_token_id = self._token_id(BOI), self._token_id(EOI)
        self.mm_tokens_per_image = mm_tokens_per_image
        self.patches_per_side = patches_per_side
        tokens_per_side = int(mm_tokens_per_image**0.5)
        # Patches pooled into one token per side: (crops, p, p) grids give crops * mm tokens.
        self.merge_size = patches_per_side // tokens_per_side
        self.full_image_sequence = f"\n\n{BOI}{IMAGE * mm_tokens_per_image}{EOI}\n\n"

    def _token_id(self, token: str) -> int:
        return special_token_id(self.tokenizer, token, "a Gemma 3 checkpoint")

    @classmethod
    def from_pretrained(cls, path: str | Path, config: dict[str, Any]) -> Gemma3Processor:
        """From a local checkpoint folder (tokenizer files, preprocessor_config.json, and
        optionally chat_template.json|.jinja); token counts from config.json."""
        from transformers import AutoTokenizer

        folder = Path(path)
        if not (folder / "preprocessor_config.json").is_file():
            raise FileNotFoundError(f"{folder} has no preprocessor_config.json")
        vision = vision_config(config)
        side = int(vision.get("image_size", 896)) // int(vision.get("patch_size", 14))
        return cls(
            AutoTokenizer.from_pretrained(str(folder)),
            Gemma3ImageProcessorPil.from_pretrained(str(folder)),
            mm_tokens_per_image=int(config.get("mm_tokens_per_image") or 256),
            patches_per_side=side,
            chat_template=template_file(folder),
        )

    # ---- media ----------------------------------------------------------------------------

    def process_image(self, image: ImageSource, **_options: Any) -> MediaInput:
        """One image -> (1 + crops, 3, S, S) pixels; grid (1 + crops, p, p)."""
        out = self.image_processor(images=load_image(image))
        pixels = np.stack([np.asarray(p, dtype=np.float32) for p in out["pixel_values"]])
        side = self.patches_per_side
        return MediaInput("image", pixels, (pixels.shape[0], side, side))

    def load_media(self, ref: MediaRef) -> MediaInput:
        refuse_unaccepted([ref], self.modalities)
        return self.process_image(ref.source, **ref.options)

    # ---- text -----------------------------------------------------------------------------

    def build_prompt(self, text: str, media: list[MediaInput]) -> ProcessedPrompt:
        """Expand each ``<start_of_image>`` of a rendered prompt for its image, then tokenize."""
        text = replace_markers(text, BOI, media, lambda item: self.image_text(item.grid_thw[0] - 1))
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return ProcessedPrompt(input_ids=list(ids), media=list(media))

    def image_text(self, crops: int) -> str:
        """What one image becomes in the text (transformers' `replace_image_token`)."""
        if crops <= 0:
            return self.full_image_sequence
        seq = self.full_image_sequence
        return (
            f"Here is the original image {seq} and here are some crops to help you see better "
            + " ".join([seq] * crops)
        )
