"""Video preprocessing settings for Qwen-VL, from video_preprocessor_config.json or defaults.

Defaults are qwen_vl_utils' (the reference Qwen uses): 2 fps, 4..768 frames, 128..768 merged
tokens' worth of pixels per frame, and the per-frame pixel cap that keeps a whole video within
~90% of a 128k-token budget (transformers' ``cap_pixels_per_frame=True``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shared.media.video import DEFAULT_FPS, DEFAULT_MAX_FRAMES, DEFAULT_MIN_FRAMES

VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_PIXELS = 768 * 28 * 28
MAX_VIDEO_TOKENS = 128_000


@dataclass(frozen=True)
class VideoSettings:
    min_pixels: int = VIDEO_MIN_PIXELS
    max_pixels: int = VIDEO_MAX_PIXELS
    fps: float = DEFAULT_FPS
    min_frames: int = DEFAULT_MIN_FRAMES
    max_frames: int = DEFAULT_MAX_FRAMES
    image_mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)
    cap_pixels_per_frame: bool = True
    max_video_tokens: int = MAX_VIDEO_TOKENS

    @classmethod
    def from_config(cls, cfg: dict[str, Any], image_processor: Any) -> VideoSettings:
        """Precedence like transformers' video processor: min/max_pixels > size > defaults.
        Mean/std fall back to the image processor's."""
        size = cfg.get("size") or {}
        cap = cfg.get("cap_pixels_per_frame")
        return cls(
            min_pixels=int(cfg.get("min_pixels") or size.get("shortest_edge") or VIDEO_MIN_PIXELS),
            max_pixels=int(cfg.get("max_pixels") or size.get("longest_edge") or VIDEO_MAX_PIXELS),
            fps=float(cfg.get("fps") or DEFAULT_FPS),
            min_frames=int(cfg.get("min_frames") or DEFAULT_MIN_FRAMES),
            max_frames=int(cfg.get("max_frames") or DEFAULT_MAX_FRAMES),
            image_mean=tuple(cfg.get("image_mean") or image_processor.image_mean),
            image_std=tuple(cfg.get("image_std") or image_processor.image_std),
            cap_pixels_per_frame=True if cap is None else bool(cap),
            max_video_tokens=int(cfg.get("max_video_tokens") or MAX_VIDEO_TOKENS),
        )

    def frame_max_pixels(
        self, num_frames: int, factor: int, temporal_patch_size: int, override: int | None = None
    ) -> int:
        """Per-frame pixel cap for a video of ``num_frames`` (an explicit override wins)."""
        if override is not None:
            return override
        if not self.cap_pixels_per_frame:
            return self.max_pixels
        total = int(self.max_video_tokens * factor * factor * 0.9)
        share = total * temporal_patch_size // num_frames
        return max(min(self.max_pixels, share), int(self.min_pixels * 1.05))
