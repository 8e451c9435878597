"""M-RoPE position ids for Qwen2-VL / Qwen2.5-VL prompts (pure numpy).

Text tokens get the same position on the temporal, height and width axes; each image/video block
gets a (t, h, w) grid of positions offset by the position where it starts. Temporal ids are the
temporal-patch index (Qwen2-VL, ``tokens_per_second=None``) or that index times
``tokens_per_second * seconds_per_grid`` truncated to int (Qwen2.5-VL, videos only).

Where the text after a vision block resumes (``advance``):
- ``"max"`` (default): one past the block's largest position id, what the model authors' code
  (Qwen's original ``get_rope_index``), vLLM and transformers <= 5.2 do: the rule the models
  were trained with, and the one consistent with the decode-time delta.
- ``"spatial"``: ``start + max(h, w) // merge``, what transformers 5.3+ does. The two differ
  only for videos whose temporal extent exceeds their spatial one (long videos, or Qwen2.5-VL's
  scaled temporal ids); there transformers' text positions fall back inside the video's.
The decode-time delta is ``max(position) + 1 - len(input_ids)`` either way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from shared.media.types import MediaInput

Grid = tuple[int, int, int]
_TEXT, _IMAGE, _VIDEO = 0, 1, 2


def _normalise(media: Sequence[MediaInput | Sequence[int]]) -> list[tuple[int | None, Grid, float]]:
    """(modality or None when unknown, grid, seconds_per_grid) per media item."""
    out: list[tuple[int | None, Grid, float]] = []
    for item in media:
        if isinstance(item, MediaInput):
            kind = _IMAGE if item.modality == "image" else _VIDEO
            seconds = 1.0 if item.seconds_per_grid is None else item.seconds_per_grid
            out.append((kind, tuple(int(x) for x in item.grid_thw), seconds))
        else:
            t, h, w = (int(x) for x in item)
            out.append((None, (t, h, w), 1.0))
    return out


def vision_positions(start: int, grid: Grid, merge: int, interval: float | None) -> np.ndarray:
    """(3, t*h*w/merge^2) positions of one vision block starting at ``start``."""
    gt, gh, gw = grid[0], grid[1] // merge, grid[2] // merge
    if interval is None:
        temporal = np.arange(gt, dtype=np.int64)
    else:
        # float32 like transformers (int arange * float -> float32 tensor), then truncate.
        temporal = (np.arange(gt, dtype=np.float32) * np.float32(interval)).astype(np.int64)
    t_ids = np.repeat(temporal, gh * gw)
    h_ids = np.tile(np.repeat(np.arange(gh, dtype=np.int64), gw), gt)
    w_ids = np.tile(np.arange(gw, dtype=np.int64), gt * gh)
    return np.stack([t_ids, h_ids, w_ids]) + start


def _interval(kind: int, seconds: float, tokens_per_second: float | None) -> float | None:
    if kind != _VIDEO or tokens_per_second is None:
        return None
    # transformers multiplies a float32 second_per_grid_ts tensor by tokens_per_second.
    return float(np.float32(seconds) * np.float32(tokens_per_second))


def get_rope_index(
    input_ids: Sequence[int] | np.ndarray,
    media: Sequence[MediaInput] | Sequence[Sequence[int]],
    *,
    image_token_id: int,
    video_token_id: int,
    vision_start_token_id: int | None = None,
    spatial_merge_size: int,
    tokens_per_second: float | None = None,
    advance: Literal["spatial", "max"] = "max",
) -> tuple[np.ndarray, int]:
    """Position ids (3, L) int64 and the rope delta for one prompt whose placeholders are expanded.

    ``media`` is in prompt order (MediaInput, or bare (t, h, w) grids whose modality is taken from
    the placeholder tokens). Adjacent blocks are split by each item's token count, so they need
    not be separated by ``<|vision_start|>`` (``vision_start_token_id`` is accepted for signature
    compatibility; positions do not depend on it).
    """
    del vision_start_token_id
    ids = np.asarray(input_ids, dtype=np.int64).reshape(-1)
    length = ids.shape[0]
    kinds = np.where(ids == image_token_id, _IMAGE, np.where(ids == video_token_id, _VIDEO, _TEXT))
    bounds = np.flatnonzero(np.diff(kinds)) + 1
    starts, ends = np.r_[0, bounds], np.r_[bounds, length]
    items = _normalise(media)
    merge = spatial_merge_size

    positions = np.empty((3, length), dtype=np.int64)
    current, used = 0, 0
    for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
        if start >= end:
            continue
        kind = int(kinds[start])
        if kind == _TEXT:
            positions[:, start:end] = np.arange(end - start, dtype=np.int64) + current
            current += end - start
            continue
        offset = start
        while offset < end:  # one run of placeholders may hold several adjacent items
            if used == len(items):
                raise ValueError("more vision placeholder tokens than media items")
            item_kind, grid, seconds = items[used]
            used += 1
            if item_kind is not None and item_kind != kind:
                raise ValueError(f"media item {used - 1} does not match its placeholder modality")
            count = grid[0] * grid[1] * grid[2] // (merge * merge)
            if offset + count > end:
                raise ValueError(f"media item {used - 1} needs {count} placeholder tokens")
            block = vision_positions(
                current, grid, merge, _interval(kind, seconds, tokens_per_second)
            )
            positions[:, offset : offset + count] = block
            offset += count
            if advance == "max":
                current = int(block.max()) + 1
            else:
                current += max(grid[1], grid[2]) // merge
    if used != len(items):
        raise ValueError(f"{len(items)} media items but placeholders for {used}")
    delta = int(positions.max()) + 1 - length if length else 0
    return positions, delta
