"""SmolVLM / Idefics3 processor: chat messages + images -> ``ProcessedPrompt`` (torch-free).

Pixels come from transformers' numpy/PIL image processor (``SmolVLMImageProcessorPil``, or
Idefics3's, which is the same code): the image is resized to a longest edge of ``size``, then,
with splitting on, to whole tiles of ``max_image_size`` and cut into a rows x cols grid of tiles
plus the global image downscaled to one tile; with splitting off (or a picture of one tile) it
is only the global image. Each ``<image>`` the chat template writes is replaced in the text as
transformers' ``replace_image_token`` does, then the text is tokenized whole:

    per row r:  <fake_token_around_image><row_r_col_c><image> x n  for c = 1..cols, then \\n
    then:       \\n<fake_token_around_image><global-img><image> x n<fake_token_around_image>

Grid: ``(tiles, side, side, rows, cols)`` with side = patches per tile side. The first three
give the token count (``tiles * side^2 / merge_size^2``, merge = the pixel-shuffle scale) as
for the other families; rows and cols (0, 0 without splitting) are what the decoder needs to
rebuild this text from a feature reference alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

from shared.media.image import ImageSource, load_image
from shared.media.types import MediaInput, ProcessedPrompt
from shared.models.chat_messages import MediaRef, refuse_unaccepted
from shared.models.chat_processor import ChatProcessor, replace_markers, special_token_id
from shared.models.chat_template import template_file
from shared.models.smolvlm.config import TowerArgs

IMAGE, FAKE, GLOBAL = "<image>", "<fake_token_around_image>", "<global-img>"
_IMAGE_PROCESSORS = {"smolvlm": SmolVLMImageProcessorPil, "idefics3": Idefics3ImageProcessorPil}


class SmolVLMProcessor(ChatProcessor):
    modalities = ("text", "image")

    def __init__(
        self,
        tokenizer: Any,
        image_processor: SmolVLMImageProcessorPil | Idefics3ImageProcessorPil,
        tower: TowerArgs,
        *,
        image_seq_len: int | None = None,
        chat_template: str | None = None,
    ) -> None:
        super().__init__(tokenizer, chat_template)
        self.image_processor = image_processor
        self.image_token_id = self._token_id(IMAGE)
        self.merge_size = tower.scale_factor
        self.side = tower.vision.patches_per_side
        self.image_seq_len = image_seq_len or tower.tokens_per_tile
        if self.image_seq_len != tower.tokens_per_tile:
            raise ValueError(
                f"processor image_seq_len {self.image_seq_len} != the tower's "
                f"{tower.tokens_per_tile} tokens per tile"
            )
        tile = int(image_processor.max_image_size["longest_edge"])
        if tile != tower.vision.image_size:  # the tower takes whole tiles only
            raise ValueError(
                f"max_image_size {tile} != vision image_size {tower.vision.image_size}"
            )

    def _token_id(self, token: str) -> int:
        return special_token_id(self.tokenizer, token, "a SmolVLM checkpoint")

    @classmethod
    def from_pretrained(cls, path: str | Path, config: dict[str, Any]) -> SmolVLMProcessor:
        """From a local checkpoint folder (tokenizer files, preprocessor_config.json, optional
        processor_config.json with `image_seq_len` and a chat template file)."""
        from transformers import AutoTokenizer

        folder = Path(path)
        if not (folder / "preprocessor_config.json").is_file():
            raise FileNotFoundError(f"{folder} has no preprocessor_config.json")
        proc_file = folder / "processor_config.json"
        proc_cfg = json.loads(proc_file.read_text()) if proc_file.is_file() else {}
        image_cls = _IMAGE_PROCESSORS.get(config.get("model_type"), SmolVLMImageProcessorPil)
        return cls(
            AutoTokenizer.from_pretrained(str(folder)),
            image_cls.from_pretrained(str(folder)),
            TowerArgs.from_config(config),
            image_seq_len=proc_cfg.get("image_seq_len"),
            chat_template=template_file(folder),
        )

    # ---- media ----------------------------------------------------------------------------

    def process_image(self, image: ImageSource, **_options: Any) -> MediaInput:
        """One image -> (tiles, 3, S, S) pixels (row-major tiles, then the global image)."""
        out = self.image_processor(images=[[load_image(image)]], return_row_col_info=True)
        pixels = np.asarray(out["pixel_values"][0], dtype=np.float32)
        rows, cols = int(out["rows"][0][0]), int(out["cols"][0][0])
        return MediaInput("image", pixels, (pixels.shape[0], self.side, self.side, rows, cols))

    def load_media(self, ref: MediaRef) -> MediaInput:
        refuse_unaccepted([ref], self.modalities)
        return self.process_image(ref.source, **ref.options)

    # ---- text -----------------------------------------------------------------------------

    def apply_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool,
        tools: list[dict[str, Any]] | None,
        template_kwargs: dict[str, Any],
    ) -> str:
        parts = [_with_parts(m) for m in messages]
        return super().apply_template(parts, add_generation_prompt, tools, template_kwargs)

    def build_prompt(self, text: str, media: list[MediaInput]) -> ProcessedPrompt:
        """Expand each ``<image>`` of a rendered prompt for its image, then tokenize."""
        text = replace_markers(text, IMAGE, media, lambda item: self.image_text(*tile_layout(item)))
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return ProcessedPrompt(input_ids=list(ids), media=list(media))

    def image_text(self, rows: int, cols: int) -> str:
        """What one image becomes in the text (transformers' `replace_image_token`)."""
        tokens = IMAGE * self.image_seq_len
        global_image = f"{FAKE}{GLOBAL}{tokens}{FAKE}"
        if rows == 0 and cols == 0:
            return global_image
        lines = [
            "".join(f"{FAKE}<row_{r + 1}_col_{c + 1}>{tokens}" for c in range(cols)) + "\n"
            for r in range(rows)
        ]
        return "".join(lines) + "\n" + global_image


def tile_layout(item: MediaInput) -> tuple[int, int]:
    """(rows, cols) of an image's tiles from its grid; (0, 0) when it was not split."""
    if item.modality != "image" or len(item.grid_thw) != 5:
        raise ValueError(f"an image needs a (tiles, side, side, rows, cols) grid: {item.grid_thw}")
    tiles, _, _, rows, cols = item.grid_thw
    if tiles != (rows * cols + 1 if rows or cols else 1) or min(rows, cols) < 0:
        raise ValueError(f"grid {item.grid_thw}: {tiles} tiles for {rows} x {cols} + 1")
    return int(rows), int(cols)


def _with_parts(message: dict[str, Any]) -> dict[str, Any]:
    """String content as one text part: the published SmolVLM templates only read lists (they
    would silently drop a string, e.g. every text-only turn the decoder forwards)."""
    content = message.get("content")
    if isinstance(content, str):
        return {**message, "content": [{"type": "text", "text": content}]}
    return message
