"""Tensors <-> bytes for the wire and the disk tier. bfloat16 travels as its raw 16-bit words
(numpy has no bfloat16), so every dtype round-trips bit-exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import mlx.core as mx
import numpy as np

CHUNK_BYTES = 1024 * 1024

# dtypes numpy lacks, carried as same-width unsigned words.
_WIRE_VIEW = {"bfloat16": "uint16"}


def dtype_name(array: mx.array) -> str:
    return str(array.dtype).removeprefix("mlx.core.")


def to_bytes(array: mx.array) -> bytes:
    """C-order bytes through the buffer protocol: no MLX op, so safe off the MLX thread
    (the array must already be evaluated)."""
    return bytes(memoryview(array))


def from_bytes(data: bytes | memoryview, dtype: str, shape: Iterable[int]) -> mx.array:
    shape = tuple(int(s) for s in shape)
    view = _WIRE_VIEW.get(dtype)
    arr = np.frombuffer(data, dtype=np.dtype(view or dtype)).reshape(shape)
    out = mx.array(arr)
    return out.view(getattr(mx, dtype)) if view else out


def nbytes(dtype: str, shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * getattr(mx, dtype).size


def chunks(data: bytes, size: int = CHUNK_BYTES) -> Iterator[bytes]:
    view = memoryview(data)
    for start in range(0, len(view), size):
        yield bytes(view[start : start + size])
