"""Qwen2-VL / Qwen2.5-VL processor: chat messages + media -> ``ProcessedPrompt`` (torch-free).

Images go through transformers' numpy/PIL ``Qwen2VLImageProcessorPil`` unchanged. Videos reuse
its resize / rescale / normalize per frame (with the video pixel budget) and are patchified here in
the layout of transformers' ``Qwen2VLVideoProcessor.patchify``. Placeholders are expanded on token
ids: each ``<|image_pad|>`` / ``<|video_pad|>`` becomes ``MediaInput.num_tokens(merge)`` copies.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from transformers.image_utils import SizeDict
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from shared.media.image import ImageSource, load_image
from shared.media.types import MediaInput, ProcessedPrompt
from shared.media.video import load_video, stack_frames
from shared.models.chat_messages import MediaRef
from shared.models.chat_processor import ChatProcessor, expand_placeholders, special_token_id
from shared.models.chat_template import template_file
from shared.models.qwen2_vl.video_settings import VideoSettings


def patchify_frames(frames: np.ndarray, patch: int, merge: int, temporal: int) -> np.ndarray:
    """(T, C, H, W) float frames -> (t*h*w, C*temporal*patch*patch) patches.

    Row order (t, h/merge, w/merge, merge_h, merge_w) and column order (C, temporal, ph, pw) match
    transformers' image and video processors, so 2 identical frames give the image's patches.
    """
    if pad := -frames.shape[0] % temporal:  # odd frame count: repeat the last frame
        frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)])
    n, c, height, width = frames.shape
    gt, gh, gw = n // temporal, height // patch, width // patch
    x = frames.reshape(gt, temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return np.ascontiguousarray(x.reshape(gt * gh * gw, c * temporal * patch * patch))


def video_frames(frames: np.ndarray | Sequence[ImageSource]) -> np.ndarray:
    """A video as (T, H, W, 3) frames, stacked when given as images; refuses other shapes."""
    if not isinstance(frames, np.ndarray):
        frames = stack_frames(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise ValueError(f"video frames must be (T, H, W, 3), got {frames.shape}")
    return frames


class QwenVLProcessor(ChatProcessor):
    modalities = ("text", "image", "video")

    def __init__(
        self,
        tokenizer: Any,
        image_processor: Qwen2VLImageProcessorPil,
        video: VideoSettings | None = None,
        chat_template: str | None = None,
    ) -> None:
        super().__init__(tokenizer, chat_template)
        self.image_processor = image_processor
        self.video = video or VideoSettings.from_config({}, image_processor)
        self.patch_size = int(image_processor.patch_size)
        self.merge_size = int(image_processor.merge_size)
        self.temporal_patch_size = int(image_processor.temporal_patch_size)
        self.image_token_id = self._token_id("<|image_pad|>")
        self.video_token_id = self._token_id("<|video_pad|>")
        self.vision_start_token_id = self._token_id("<|vision_start|>")
        self.vision_end_token_id = self._token_id("<|vision_end|>")

    def _token_id(self, token: str) -> int:
        return special_token_id(self.tokenizer, token, "a Qwen-VL checkpoint")

    @classmethod
    def from_pretrained(cls, path: str | Path) -> QwenVLProcessor:
        """From a local checkpoint folder (tokenizer files, preprocessor_config.json, and
        optionally video_preprocessor_config.json / chat_template.json|.jinja)."""
        from transformers import AutoTokenizer

        folder = Path(path)
        if not (folder / "preprocessor_config.json").is_file():
            raise FileNotFoundError(f"{folder} has no preprocessor_config.json")
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(str(folder))
        video_file = folder / "video_preprocessor_config.json"
        video_cfg = json.loads(video_file.read_text()) if video_file.is_file() else {}
        return cls(
            tokenizer,
            image_processor,
            VideoSettings.from_config(video_cfg, image_processor),
            chat_template=template_file(folder),
        )

    # ---- media ----------------------------------------------------------------------------

    def process_image(self, image: ImageSource, **options: Any) -> MediaInput:
        kwargs = {}
        if "min_pixels" in options or "max_pixels" in options:
            size = self.image_processor.size
            kwargs["size"] = {
                "shortest_edge": int(options.get("min_pixels", size.shortest_edge)),
                "longest_edge": int(options.get("max_pixels", size.longest_edge)),
            }
        out = self.image_processor(images=load_image(image), **kwargs)
        grid = tuple(int(x) for x in out["image_grid_thw"][0])
        return MediaInput("image", np.asarray(out["pixel_values"], dtype=np.float32), grid)

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
        ip, v = self.image_processor, self.video
        factor = self.patch_size * self.merge_size
        lo = min_pixels or v.min_pixels
        hi = v.frame_max_pixels(frames.shape[0], factor, self.temporal_patch_size, max_pixels)
        size = SizeDict(shortest_edge=lo, longest_edge=hi)
        processed = []
        for frame in frames:  # the image processor's own steps, so frames match images exactly
            x = np.moveaxis(np.asarray(frame, dtype=np.uint8), -1, 0)  # CHW, as the image path
            if ip.do_resize:
                x = ip.resize(x, size=size, resample=ip.resample, factor=factor)
            if ip.do_rescale:
                x = ip.rescale(x, ip.rescale_factor)
            if ip.do_normalize:
                x = ip.normalize(x, v.image_mean, v.image_std)
            processed.append(x)
        stacked = np.stack(processed).astype(np.float32)
        return self.video_input(stacked, stacked.shape[2:], fps)

    def video_input(
        self, stacked: np.ndarray, size: tuple[int, int], fps: float | None
    ) -> MediaInput:
        """Processed (T, C, H, W) float32 frames, sized `size`, sampled at `fps` (default: the
        video settings') -> their patches, (t, h, w) grid and seconds per temporal patch."""
        pixels = patchify_frames(
            stacked, self.patch_size, self.merge_size, self.temporal_patch_size
        )
        grid_t = -(-stacked.shape[0] // self.temporal_patch_size)
        grid = (grid_t, size[0] // self.patch_size, size[1] // self.patch_size)
        fps = fps or self.video.fps
        return MediaInput("video", pixels, grid, seconds_per_grid=self.temporal_patch_size / fps)

    def load_media(self, ref: MediaRef) -> MediaInput:
        opts = ref.options
        if ref.modality == "image":
            return self.process_image(ref.source, **opts)
        pixels = {k: int(opts[k]) for k in ("min_pixels", "max_pixels") if k in opts}
        if isinstance(ref.source, (list, tuple)):  # a video given as its frames
            return self.process_video(list(ref.source), opts.get("fps"), **pixels)
        num_frames = opts.get("num_frames", opts.get("nframes"))
        num_frames = None if num_frames is None else int(num_frames)
        clip = load_video(
            ref.source,
            fps=None if num_frames is not None else float(opts.get("fps", self.video.fps)),
            num_frames=num_frames,
            min_frames=int(opts.get("min_frames", self.video.min_frames)),
            max_frames=int(opts.get("max_frames", self.video.max_frames)),
            temporal_patch_size=self.temporal_patch_size,
        )
        return self.process_video(clip.frames, clip.fps, **pixels)

    # ---- text -----------------------------------------------------------------------------

    def build_prompt(self, text: str, media: list[MediaInput]) -> ProcessedPrompt:
        """Tokenize a rendered prompt holding one pad token per media item, and expand them."""
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return ProcessedPrompt(input_ids=self.expand(ids, media), media=list(media))

    def expand(self, input_ids: Sequence[int], media: Sequence[MediaInput]) -> list[int]:
        return expand_placeholders(
            input_ids,
            media,
            [self.image_token_id, self.video_token_id],
            self._item_tokens,
            placeholders="image/video",
            items="media",
        )

    def _item_tokens(self, slot: int, token: int, item: MediaInput) -> int:
        expected = self.image_token_id if item.modality == "image" else self.video_token_id
        if token != expected:
            raise ValueError(f"placeholder at token {slot} does not match a {item.modality}")
        return item.num_tokens(self.merge_size)
