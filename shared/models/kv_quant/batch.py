"""Quantized / windowed slot caches for continuous batching, on `batch_cache.BatchLayout`.

Same geometry as `BatchKVCache`: every part of the keys and values (codes, scales, norms...)
is a (slots, n_kv, capacity, X) buffer, a step scatters each row's new tokens at the
layout's `flat_index` (so rows carrying several tokens, for speculative verification, work
unchanged) and attention reads rows [0, rows) x positions [0, span) under the layout's mask.
A prompt is prefilled on a full-precision `KVCache` elsewhere and quantized by `insert`.

With a window, `WindowLayout` maps each row's next token to its slot in the ring (see
`window.Window`) and lets full rows see the whole window.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ..batch_cache import T_STEP, BatchLayout, resize, scatter_rows
from ..batch_cache import make_batch_caches as make_plain_batch_caches
from .cache import make_codec, make_window, select_window
from .codec import KVCodec, Mask, Parts
from .config import KVQuantConfig
from .protocol import AttendingCache
from .window import Window


class WindowLayout(BatchLayout):
    """A `BatchLayout` whose rows write into a rotating window of `window.size` slots."""

    def __init__(self, window: Window) -> None:
        super().__init__()
        self.window = window

    def reset(self) -> None:
        BatchLayout.__init__(self)  # the base re-runs __init__(); keep the window

    def begin(self, lengths: np.ndarray, max_slots: int, width: int = 1) -> None:
        if width != 1:
            raise ValueError("a KV window decodes one token per row (no speculative tokens)")
        super().begin(self.window.slot(lengths), max_slots)  # write at each row's ring slot
        visible = np.minimum(lengths + 1, self.window.size)  # a full window: every slot
        self.span = int(visible.max())
        self.capacity = max(self.capacity, -(-self.span // T_STEP) * T_STEP)
        seen = mx.arange(self.span)[None, :] < mx.array(visible.astype(np.int32))[:, None]
        self.mask = seen[:, None, None, :]

    def reserve(self, slot: int, length: int, max_slots: int) -> None:
        super().reserve(slot, self.window.stored(length), max_slots)

    def shrink(self, longest: int) -> bool:
        return super().shrink(min(longest, self.window.size - 1))


class BatchQuantCache(AttendingCache):
    """One layer's slot buffers in `codec`'s storage format."""

    def __init__(self, layout: BatchLayout, codec: KVCodec, window: Window | None) -> None:
        self.layout, self.codec, self.window = layout, codec, window
        self.keys: Parts = ()
        self.values: Parts = ()
        self.offset = 0  # unused: batched calls always pass per-row position ids

    def make_mask(self, length: int) -> mx.array:
        mask = self.layout.mask
        assert mask is not None, "BatchLayout.begin first"
        if mask.shape[2] != length:
            raise ValueError(f"this step lays out {mask.shape[2]} tokens per row, got {length}")
        return mask

    def attend(
        self, queries: mx.array, keys: mx.array, values: mx.array, scale: float, mask: Mask
    ) -> mx.array:
        lay = self.layout
        k, v = self.codec.encode_keys(keys), self.codec.encode_values(values)
        self._fit(k, v)
        flat = lay.flat_index(keys.shape[1])
        self.keys = tuple(scatter_rows(b, flat, n) for b, n in zip(self.keys, k, strict=True))
        self.values = tuple(scatter_rows(b, flat, n) for b, n in zip(self.values, v, strict=True))
        rows, span = keys.shape[0], lay.span
        k, v = (tuple(b[:rows, :, :span, :] for b in p) for p in (self.keys, self.values))
        return self.codec.attention(queries, k, v, scale, mask)

    def insert(self, slot: int, keys: mx.array, values: mx.array) -> None:
        """Quantize one prefilled sequence's (1, n_kv, L, D) keys/values into `slot`."""
        keys, values = select_window(keys, self.window), select_window(values, self.window)
        k, v = self.codec.encode_keys(keys), self.codec.encode_values(values)
        self._fit(k, v)
        n = keys.shape[2]
        for buf, new in zip(self.keys + self.values, k + v, strict=True):
            buf[slot : slot + 1, :, :n, :] = new

    def release(self) -> None:
        self.keys = self.values = ()

    @property
    def state(self) -> Parts:
        return self.keys + self.values

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in self.keys + self.values)

    def _fit(self, keys: Parts, values: Parts) -> None:
        """Buffers at the layout's slot and token capacities, contents kept."""
        slots, capacity = self.layout.slots, self.layout.capacity
        self.keys = _fit(self.keys, keys, slots, capacity)
        self.values = _fit(self.values, values, slots, capacity)


def _fit(buffers: Parts, like: Parts, slots: int, capacity: int) -> Parts:
    if not buffers:
        return tuple(mx.zeros((slots, p.shape[1], capacity, p.shape[3]), p.dtype) for p in like)
    return tuple(resize(b, slots, capacity) for b in buffers)


def make_batch_caches(num_layers: int, cfg: KVQuantConfig) -> tuple[BatchLayout, list]:
    """The layout and per-layer slot caches for `cfg` (the plain ones when it is inactive)."""
    if not cfg.active:
        return make_plain_batch_caches(num_layers)
    window = make_window(cfg)
    layout = WindowLayout(window) if window is not None else BatchLayout()
    codec = make_codec(cfg)
    return layout, [BatchQuantCache(layout, codec, window) for _ in range(num_layers)]
