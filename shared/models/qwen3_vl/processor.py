"""Qwen3-VL processor: chat messages + media -> `ProcessedPrompt` (torch-free).

Images are Qwen2-VL's (transformers' numpy/PIL image processor; Qwen3-VL checkpoints set
patch 16 and mean/std 0.5). Videos are sized for the whole clip (`video.smart_resize`), and
each `<|video_pad|>` becomes, per temporal patch, `<{t:.1f} seconds>` followed by
`<|vision_start|>` + that frame's pads + `<|vision_end|>` (transformers'
`Qwen3VLProcessor.replace_video_token`; the template's own vision_start/end stay around it).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from transformers.image_utils import SizeDict
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from shared.media.image import ImageSource
from shared.media.types import MediaInput, ProcessedPrompt
from shared.models.chat_template import template_file
from shared.models.qwen2_vl.processor import QwenVLProcessor, video_frames
from shared.models.qwen3_vl.video import Qwen3VideoSettings, frame_timestamps, smart_resize

_PADS = re.compile(r"<\|image_pad\|>|<\|video_pad\|>")
_NO_PIXELS = np.zeros((0, 0), dtype=np.float32)


class Qwen3VLProcessor(QwenVLProcessor):
    video: Qwen3VideoSettings  # type: ignore[assignment]

    def __init__(
        self,
        tokenizer: Any,
        image_processor: Qwen2VLImageProcessorPil,
        video: Qwen3VideoSettings | None = None,
        chat_template: str | None = None,
    ) -> None:
        super().__init__(tokenizer, image_processor, None, chat_template)
        self.video = video or Qwen3VideoSettings()

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Qwen3VLProcessor:
        from transformers import AutoTokenizer

        folder = Path(path)
        if not (folder / "preprocessor_config.json").is_file():
            raise FileNotFoundError(f"{folder} has no preprocessor_config.json")
        video_file = folder / "video_preprocessor_config.json"
        video_cfg = json.loads(video_file.read_text()) if video_file.is_file() else {}
        return cls(
            AutoTokenizer.from_pretrained(str(folder)),
            Qwen2VLImageProcessorPil.from_pretrained(str(folder)),
            Qwen3VideoSettings.from_config(video_cfg),
            chat_template=template_file(folder),
        )

    # ---- video ----------------------------------------------------------------------------

    def process_video(
        self,
        frames: np.ndarray | Sequence[ImageSource],
        fps: float | None = None,
        *,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
    ) -> MediaInput:
        """Frames (T, H, W, 3) uint8 (or a list of images) sampled at ``fps`` -> MediaInput."""
        frames = video_frames(frames)
        n, height, width = frames.shape[:3]
        factor = self.patch_size * self.merge_size
        v = self.video
        size = smart_resize(
            n, height, width, self.temporal_patch_size, factor,
            min_pixels or v.min_pixels, v.clip_max_pixels(n, factor, max_pixels),
        )  # fmt: skip
        stacked = np.stack([self._frame(f, size) for f in frames]).astype(np.float32)
        return self.video_input(stacked, size, fps)

    def _frame(self, frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """One frame resized to `size` (bicubic, as the image path), rescaled, normalised."""
        ip = self.image_processor
        x = np.moveaxis(np.asarray(frame, dtype=np.uint8), -1, 0)  # CHW, as the image path
        if ip.do_resize:
            # The image processor's own resize minus its per-image smart_resize.
            resize = super(Qwen2VLImageProcessorPil, ip).resize
            x = resize(image=x, size=SizeDict(height=size[0], width=size[1]), resample=ip.resample)
        if ip.do_rescale:
            x = ip.rescale(x, ip.rescale_factor)
        if ip.do_normalize:
            x = ip.normalize(x, self.video.image_mean, self.video.image_std)
        return x

    # ---- text -----------------------------------------------------------------------------

    def build_prompt(self, text: str, media: list[MediaInput]) -> ProcessedPrompt:
        """Tokenize a rendered prompt holding one pad token per media item; give each video
        frame its timestamp and vision markers, then expand every pad to its token count."""
        pieces = _PADS.split(text)
        if len(pieces) - 1 != len(media):
            raise ValueError(
                f"prompt has {len(pieces) - 1} image/video placeholders, got {len(media)} media"
            )
        out = [pieces[0]]
        for pad, item, rest in zip(_PADS.findall(text), media, pieces[1:], strict=True):
            out.append(self._video_text(item) if pad == "<|video_pad|>" else pad)
            out.append(rest)
        ids = self.tokenizer.encode("".join(out), add_special_tokens=False)
        return ProcessedPrompt(input_ids=self.expand(ids, frame_items(media)), media=list(media))

    def _video_text(self, item: MediaInput) -> str:
        if item.modality != "video":
            raise ValueError(f"a video placeholder does not match a {item.modality}")
        seconds = frame_timestamps(
            item.grid_thw[0], item.seconds_per_grid or 1.0, self.temporal_patch_size
        )
        return "".join(
            f"<{t:.1f} seconds><|vision_start|><|video_pad|><|vision_end|>" for t in seconds
        )


def frame_items(media: Sequence[MediaInput]) -> list[MediaInput]:
    """Media split per placeholder run: images whole, videos one (1, h, w) item per frame."""
    out = []
    for item in media:
        t, h, w = item.grid_thw
        if item.modality == "image":
            out.append(item)
            continue
        frame = dataclasses.replace(item, pixel_values=_NO_PIXELS, grid_thw=(1, h, w))
        out.extend([frame] * t)
    return out
