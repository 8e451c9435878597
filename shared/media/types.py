"""Typed, model-ready media: what a processor produces and a vision tower consumes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

Modality = Literal["image", "video", "audio"]


@dataclass(frozen=True)
class MediaInput:
    """One image or video after preprocessing, in the layout the vision tower expects.

    pixel_values: (t*h*w, C*temporal_patch*patch*patch) float32 flattened patches.
    grid_thw: patch counts along time, height and width (before spatial merging).
    seconds_per_grid: seconds spanned by one temporal patch (videos; Qwen2.5-VL uses it
        for temporal rotary positions). None for images.
    tokens: placeholder tokens when the grid does not give them (audio: `pixel_values` holds
        the (1, mel bins, frames) log-mel input, `grid_thw` its unpadded frame count (frames,)).
    """

    modality: Modality
    pixel_values: np.ndarray
    grid_thw: tuple[int, ...]
    seconds_per_grid: float | None = None
    tokens: int | None = None

    def num_tokens(self, merge_size: int) -> int:
        if self.tokens is not None:
            return self.tokens
        t, h, w = self.grid_thw[:3]  # SmolVLM appends its tile rows and cols
        return t * h * w // (merge_size * merge_size)


@dataclass
class ProcessedPrompt:
    """Token ids with placeholders already expanded, and the media in prompt order."""

    input_ids: list[int]
    media: list[MediaInput] = field(default_factory=list)
