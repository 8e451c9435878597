"""Pack b-bit codes (b = 1..4, 8) into uint32 words along the last axis.

A width that does not divide 32 is split into planes that do (3 bits = a 2-bit plane + a
1-bit plane), so no code straddles a word and unpacking is shifts and masks only. The last
axis must be a multiple of 32; d codes of b bits take d * b / 32 words.
"""

from __future__ import annotations

from functools import cache

import mlx.core as mx

_PLANES = {1: (1,), 2: (2,), 3: (2, 1), 4: (4,), 8: (8,)}


@cache
def _shifts(width: int) -> mx.array:
    return (mx.arange(32 // width) * width).astype(mx.uint32)


def pack(codes: mx.array, bits: int) -> mx.array:
    """(..., d) integer codes < 2**bits -> (..., d * bits // 32) uint32."""
    codes = codes.astype(mx.uint32)
    words, low = [], 0
    for width in _PLANES[bits]:
        plane = (codes >> low) & ((1 << width) - 1)
        plane = plane.reshape(*codes.shape[:-1], -1, 32 // width) << _shifts(width)
        words.append(plane.sum(axis=-1).astype(mx.uint32))  # disjoint bits: sum == or
        low += width
    return words[0] if len(words) == 1 else mx.concatenate(words, axis=-1)


def unpack(words: mx.array, bits: int) -> mx.array:
    """Inverse of `pack`: (..., d * bits // 32) uint32 -> (..., d) uint32 codes."""
    d = words.shape[-1] * 32 // bits
    codes, start, low = None, 0, 0
    for width in _PLANES[bits]:
        n = d * width // 32
        plane = (words[..., start : start + n, None] >> _shifts(width)) & ((1 << width) - 1)
        plane = plane.reshape(*words.shape[:-1], d) << low
        codes = plane if codes is None else codes | plane
        start, low = start + n, low + width
    assert codes is not None
    return codes
