"""Qwen3-VL video settings and frame sizing (transformers' `Qwen3VLVideoProcessor`), torch-free.

Unlike Qwen2-VL, the pixel budget covers the whole clip: `smart_resize` compares
frames x height x width against min/max pixels. `cap_pixels_per_frame` (off unless the config
turns it on, as in transformers) caps each frame at `max_video_tokens` merged tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

IMAGENET_STANDARD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class Qwen3VideoSettings:
    min_pixels: int = 128 * 32 * 32
    max_pixels: int = 768 * 32 * 32
    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 768
    image_mean: tuple[float, ...] = IMAGENET_STANDARD
    image_std: tuple[float, ...] = IMAGENET_STANDARD
    cap_pixels_per_frame: bool = False
    max_video_tokens: int = 768

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> Qwen3VideoSettings:
        """From video_preprocessor_config.json (`size` or flat min/max_pixels)."""
        size = cfg.get("size") or {}
        d = cls()
        return cls(
            min_pixels=int(cfg.get("min_pixels") or size.get("shortest_edge") or d.min_pixels),
            max_pixels=int(cfg.get("max_pixels") or size.get("longest_edge") or d.max_pixels),
            fps=float(cfg.get("fps") or d.fps),
            min_frames=int(cfg.get("min_frames") or d.min_frames),
            max_frames=int(cfg.get("max_frames") or d.max_frames),
            image_mean=tuple(cfg.get("image_mean") or d.image_mean),
            image_std=tuple(cfg.get("image_std") or d.image_std),
            cap_pixels_per_frame=bool(cfg.get("cap_pixels_per_frame") or False),
            max_video_tokens=int(cfg.get("max_video_tokens") or d.max_video_tokens),
        )

    def clip_max_pixels(self, num_frames: int, factor: int, override: int | None) -> int:
        """The whole clip's pixel budget (an explicit max_pixels option wins)."""
        if override is not None:
            return override
        if not self.cap_pixels_per_frame:
            return self.max_pixels
        frame_cap = self.max_video_tokens * factor * factor
        per_frame = max(min(frame_cap, self.max_pixels // num_frames), int(self.min_pixels * 1.05))
        return per_frame * num_frames


def smart_resize(
    num_frames: int,
    height: int,
    width: int,
    temporal_factor: int,
    factor: int,
    min_pixels: int,
    max_pixels: int,
) -> tuple[int, int]:
    """transformers' `video_processing_qwen3_vl.smart_resize`: (height, width) multiples of
    `factor` whose frames x height x width fits [min_pixels, max_pixels]."""
    if num_frames < temporal_factor:
        raise ValueError(f"a video needs at least {temporal_factor} frames, got {num_frames}")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise ValueError("video aspect ratio must be smaller than 200")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def frame_timestamps(grid_t: int, seconds_per_grid: float, temporal_patch_size: int) -> list[float]:
    """Seconds of each temporal patch: the mean time of its first and last frame, frames being
    evenly spaced from 0 (transformers' `_calculate_timestamps` for frames sampled at a fixed
    rate). Derived from `seconds_per_grid` alone, so the decoder, which sees no frames, renders
    the same prompt as the in-process path."""
    frame = seconds_per_grid / temporal_patch_size
    return [
        (i * temporal_patch_size + (temporal_patch_size - 1) / 2) * frame for i in range(grid_t)
    ]
