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
from shared.models.qwen2_vl.messages import MediaRef, normalise_messages
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


class QwenVLProcessor:
    modalities = ("text", "image", "video")

    def __init__(
        self,
        tokenizer: Any,
        image_processor: Qwen2VLImageProcessorPil,
        video: VideoSettings | None = None,
        chat_template: str | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.video = video or VideoSettings.from_config({}, image_processor)
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        self.patch_size = int(image_processor.patch_size)
        self.merge_size = int(image_processor.merge_size)
        self.temporal_patch_size = int(image_processor.temporal_patch_size)
        self.image_token_id = self._token_id("<|image_pad|>")
        self.video_token_id = self._token_id("<|video_pad|>")
        self.vision_start_token_id = self._token_id("<|vision_start|>")
        self.vision_end_token_id = self._token_id("<|vision_end|>")

    def _token_id(self, token: str) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no {token} token; is this a Qwen-VL checkpoint?")
        return int(token_id)

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
            chat_template=_template_file(folder),
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
        if not isinstance(frames, np.ndarray):
            frames = stack_frames(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
            raise ValueError(f"video frames must be (T, H, W, 3), got {frames.shape}")
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
        height, width = stacked.shape[2:]
        pixels = patchify_frames(
            stacked, self.patch_size, self.merge_size, self.temporal_patch_size
        )
        grid_t = -(-stacked.shape[0] // self.temporal_patch_size)
        grid = (grid_t, height // self.patch_size, width // self.patch_size)
        fps = fps or v.fps
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

    def render(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **template_kwargs: Any,
    ) -> str:
        normalised, _ = normalise_messages(messages)
        return self._render(normalised, add_generation_prompt, tools, template_kwargs)

    def _render(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool,
        tools: list[dict[str, Any]] | None,
        template_kwargs: dict[str, Any],
    ) -> str:
        if self.chat_template is None:
            raise ValueError("this checkpoint has no chat template")
        if tools is not None:
            template_kwargs["tools"] = tools
        return self.tokenizer.apply_chat_template(
            messages,
            chat_template=self.chat_template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            **template_kwargs,
        )

    def __call__(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **template_kwargs: Any,
    ) -> ProcessedPrompt:
        normalised, refs = normalise_messages(messages)
        text = self._render(normalised, add_generation_prompt, tools, template_kwargs)
        return self.build_prompt(text, [self.load_media(ref) for ref in refs])

    def build_prompt(self, text: str, media: list[MediaInput]) -> ProcessedPrompt:
        """Tokenize a rendered prompt holding one pad token per media item, and expand them."""
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return ProcessedPrompt(input_ids=self.expand(ids, media), media=list(media))

    def expand(self, input_ids: Sequence[int], media: Sequence[MediaInput]) -> list[int]:
        ids = np.asarray(input_ids, dtype=np.int64)
        slots = np.flatnonzero((ids == self.image_token_id) | (ids == self.video_token_id))
        if len(slots) != len(media):
            raise ValueError(
                f"prompt has {len(slots)} image/video placeholders, got {len(media)} media"
            )
        repeats = np.ones(len(ids), dtype=np.int64)
        for slot, item in zip(slots.tolist(), media, strict=True):
            expected = self.image_token_id if item.modality == "image" else self.video_token_id
            if ids[slot] != expected:
                raise ValueError(f"placeholder at token {slot} does not match a {item.modality}")
            repeats[slot] = item.num_tokens(self.merge_size)
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
