"""Single-sequence quantized / windowed KV caches (`prism generate`), and the conversion the
decode path applies once the prompt is prefilled.

The prompt always prefills on full-precision `KVCache`s (exact prompt attention, exact APC
blocks); `decode_caches` then quantizes (and, with a window, trims) that KV into one
`QuantKVCache` per layer, which every decode step appends to and attends from.
"""

from __future__ import annotations

import mlx.core as mx

from ..cache import KVCache
from .codec import FullPrecision, KVCodec, Mask, Parts
from .config import KVQuantConfig
from .protocol import AttendingCache
from .turboquant import TurboQuantCodec
from .uniform import UniformCodec
from .window import Window

STEP = 256  # grow the token capacity in steps, like KVCache


def make_codec(cfg: KVQuantConfig) -> KVCodec:
    if not cfg.quantized:
        return FullPrecision()
    if cfg.scheme == "uniform":
        return UniformCodec(int(cfg.bits), cfg.group_size)
    return TurboQuantCodec(cfg.key_bits, cfg.value_bits)


def make_window(cfg: KVQuantConfig) -> Window | None:
    return Window(cfg.max_kv_size, cfg.keep) if cfg.max_kv_size else None


def select_window(keys: mx.array, window: Window | None) -> mx.array:
    """A prompt's (B, n_kv, L, D) KV as the window holds it: kept tokens at their slots."""
    order = None if window is None else window.order(keys.shape[2])
    return keys if order is None else keys[:, :, mx.array(order)]


class QuantKVCache(AttendingCache):
    def __init__(self, codec: KVCodec, window: Window | None = None) -> None:
        self.codec, self.window = codec, window
        self.keys: Parts = ()
        self.values: Parts = ()
        self.offset = 0

    def load(self, keys: mx.array, values: mx.array) -> None:
        """Start from a prefilled prompt's full-precision (B, n_kv, L, D) keys/values."""
        length = keys.shape[2]
        keys, values = select_window(keys, self.window), select_window(values, self.window)
        self._write(0, self.codec.encode_keys(keys), self.codec.encode_values(values))
        self.offset = length

    def attend(
        self, queries: mx.array, keys: mx.array, values: mx.array, scale: float, mask: Mask
    ) -> mx.array:
        length, start = keys.shape[2], self.offset
        if self.window is not None:
            if length > 1 and start + length > self.window.size:
                raise ValueError("a full KV window takes one token per step: prefill on KVCache")
            start = int(self.window.slot(start))
        self._write(start, self.codec.encode_keys(keys), self.codec.encode_values(values))
        self.offset += length
        n = self.offset if self.window is None else self.window.stored(self.offset)
        k, v = (tuple(x[..., :n, :] for x in parts) for parts in (self.keys, self.values))
        return self.codec.attention(queries, k, v, scale, mask)

    def _write(self, start: int, keys: Parts, values: Parts) -> None:
        end = start + keys[0].shape[2]
        self.keys, self.values = _grow(self.keys, keys, end), _grow(self.values, values, end)
        for buf, new in zip(self.keys + self.values, keys + values, strict=True):
            buf[..., start:end, :] = new

    @property
    def state(self) -> Parts:
        n = self.offset if self.window is None else self.window.stored(self.offset)
        return tuple(x[..., :n, :] for x in self.keys + self.values)

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in self.keys + self.values)


def _grow(buffers: Parts, new: Parts, needed: int) -> Parts:
    """Buffers shaped like `new` with room for `needed` tokens (whole STEPs), contents kept."""
    have = buffers[0].shape[2] if buffers else 0
    if needed <= have:
        return buffers
    size = -(-needed // STEP) * STEP
    out = []
    for i, part in enumerate(new):
        b, h, _, x = part.shape
        extra = mx.zeros((b, h, size - have, x), part.dtype)
        out.append(mx.concatenate([buffers[i], extra], axis=2) if buffers else extra)
    return tuple(out)


def decode_caches(prefill: list[KVCache], cfg: KVQuantConfig) -> list:
    """The decode caches for a prompt prefilled into `prefill` (returned as is when `cfg` is
    plain full precision without a window)."""
    if not cfg.active:
        return prefill
    codec, window = make_codec(cfg), make_window(cfg)
    out = []
    for layer in prefill:
        cache = QuantKVCache(codec, window)
        cache.load(*layer.state)
        out.append(cache)
    return out
