"""Attention masks of Gemma 3, as transformers builds them (True = may attend).

Full-attention layers: causal, OR the same image (image tokens attend bidirectionally within
their image: `image_blocks` gives each prompt token its image's index, -1 for text).
Sliding layers: that, AND the key is one of the last `window` positions (k > q - window).

Every cache keeps full KV (APC blocks stay complete), so the window is a mask, never an
eviction. Each layer type gets `(mask, first_key)`: attention reads keys [first_key, end) only.
- batch decode (the slot cache's `layout`: rows, `width` tokens each from `write`, `span`
  keys): the layout's causal mask, windowed per row; every key is read (rows differ);
- prefill chunk / single-sequence step after `offset` cached tokens: an explicit mask when an
  image or the window matters, else MLX's "causal" (its fast path). A sliding layer reads only
  from `offset - window + 1` on, the oldest key its first query may see, so a long prompt costs
  it O(L * (window + L)), not O(L * (offset + L)).
Image blocks only ever matter within a chunk: a cached key is older than every query, so the
causal part already shows it. A chunk must therefore not end inside an image (see
`PrefillInputs.atomic_spans`).
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from shared.models.gemma3.config import FULL, SLIDING
from shared.models.kv_quant.protocol import AttendingCache

Mask = str | mx.array | None
# kv_quant's rotating window stores keys out of position order; these masks need positions.
_NO_KV_WINDOW = "Gemma 3 masks its own sliding window over full KV; run it without a KV window"


def layer_masks(
    cache: Any, length: int, window: int, blocks: mx.array | None
) -> dict[str, tuple[Mask, int]]:
    """`(mask, first_key)` of each layer type for one forward pass of `length` tokens a row."""
    layout = getattr(cache, "layout", None)
    if layout is not None:
        if getattr(layout, "window", None) is not None:  # kv_quant's rotating slots
            raise NotImplementedError(_NO_KV_WINDOW)
        cache.make_mask(length)  # checks the step's width
        base = layout.mask  # (rows, 1, width, span), also for one row: the window needs it
        sliding = base & _batch_window(layout.write, length, base, window)
        return {FULL: (base, 0), SLIDING: (sliding, 0)}
    if getattr(cache, "window", None) is not None:
        raise NotImplementedError(_NO_KV_WINDOW)
    offset = cache.offset if cache is not None else 0
    if blocks is not None and not bool(mx.any(blocks >= 0).item()):
        blocks = None  # a text-only chunk
    causal = "causal" if length > 1 else None
    full = causal if blocks is None else prefill_mask(offset, length, blocks, None)
    if blocks is None and offset + length <= window:
        return {FULL: (full, 0), SLIDING: (full, 0)}
    # A quantized cache attends over everything it stores itself: it cannot skip keys.
    first = 0 if isinstance(cache, AttendingCache) else max(0, offset - window + 1)
    return {FULL: (full, 0), SLIDING: (prefill_mask(offset, length, blocks, window, first), first)}


def prefill_mask(
    offset: int, length: int, blocks: mx.array | None, window: int | None, first_key: int = 0
) -> mx.array:
    """(L, offset + L - first_key) bool: queries at offset..offset+L-1 of one sequence over
    keys first_key..offset+L-1 (first_key <= offset)."""
    q = mx.arange(offset, offset + length)[:, None]
    k = mx.arange(first_key, offset + length)[None, :]
    keep = k <= q
    if blocks is not None:
        own = blocks.reshape(-1)  # (L,): this chunk's image index per token
        keys = mx.concatenate([mx.full((offset - first_key,), -1, own.dtype), own])
        keep = keep | ((own[:, None] == keys[None, :]) & (own[:, None] >= 0))
    if window is not None:
        keep = keep & (k > q - window)
    return keep


def _batch_window(write: mx.array, width: int, base: mx.array, window: int) -> mx.array:
    """(rows, 1, width, span): row i's query j sits at write[i] + j and keeps its last
    `window` positions."""
    q = write[:, None] + mx.arange(width)[None, :]  # (rows, width)
    k = mx.arange(base.shape[-1])
    return (k[None, None, :] > (q[:, :, None] - window))[:, None]
