"""A slot-based, right-padded KV cache for decoding many sequences in one forward pass.

Each layer holds keys/values buffers of shape (slots, n_kv, capacity, head_dim). Row i of a
decode step is slot i; slot i holds `lengths[i]` valid tokens at positions [0, lengths[i]).
A step feeds `width` tokens per row (1 for plain decode; 1 + k drafted tokens when a
speculative step verifies them) and writes row i's keys/values at positions
[lengths[i], lengths[i] + width) (one scatter); a boolean mask gives each of them the causal
view of its own row, so rows of different lengths share one batched matmul without ever moving
each other's KV. Rolling a row back (rejected drafts) is lowering its length: the positions
beyond it are garbage that the mask hides and the next write overwrites. Prefill happens
elsewhere (one sequence, its own `KVCache`); `insert` copies the finished prompt KV into a free
slot.

`BatchLayout` holds what all layers share for one step (rows, span, write indices, mask), so
the per-layer caches stay dumb and the model code only needs `cache.make_mask()` (see
`transformer.create_attention_mask`). Rows that are free or finished still compute (their
slot is inside the batch) but nothing reads their results: they write at their own length
and see at least that position, so their numbers stay finite (no all-masked softmax).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

T_STEP = 256  # grow the token capacity in steps, like KVCache
SLOT_STEP = 8  # grow the slot capacity in steps


def _round_up(n: int, step: int) -> int:
    return max(step, -(-n // step) * step)


class BatchLayout:
    """One decode step's geometry, computed once and read by every layer's cache."""

    def __init__(self) -> None:
        self.slots = 0  # slot capacity of every layer's buffers
        self.capacity = 0  # token capacity of every layer's buffers
        self.rows = 0  # rows in this step (slots [0, rows))
        self.width = 1  # tokens per row this step
        self.span = 0  # tokens attended this step: max(lengths[:rows]) + width
        self.write: mx.array | None = None  # (rows,) int32 position each row starts writing at
        self.mask: mx.array | None = None  # (rows, 1, width, span) bool: True = visible
        self._flat: mx.array | None = None  # scatter indices, built by the first layer

    def reset(self) -> None:
        """No live rows: forget the capacities (the caches release their buffers)."""
        self.__init__()

    def begin(self, lengths: np.ndarray, max_slots: int, width: int = 1) -> None:
        """Lay out a step of `width` tokens over rows [0, len(lengths)); grow capacities."""
        rows = len(lengths)
        self.rows, self.width, self.span = rows, width, int(lengths.max()) + width
        if width > 1:  # MLX CUDA compiles its multi-query attention kernel for each key length
            # (~0.6 s each on an H200, bench/NOTES.md): attend over whole T_STEPs, extra masked.
            self.span = _round_up(self.span, T_STEP)
        if rows > self.slots:
            self.slots = min(max_slots, _round_up(rows, SLOT_STEP))
        if self.span > self.capacity:
            self.capacity = _round_up(self.span, T_STEP)
        pos = mx.array(lengths.astype(np.int32))
        self.write, self._flat = pos, None
        # Query j of row i sits at lengths[i] + j and sees every position up to its own.
        last = pos[:, None] + mx.arange(width)[None, :]  # (rows, width)
        self.mask = (mx.arange(self.span)[None, None, :] <= last[:, :, None])[:, None]

    def flat_index(self, n_kv: int) -> mx.array:
        """(rows * n_kv * width,) indices of each row's write positions in a buffer viewed as
        (slots * n_kv * capacity, head_dim), in (row, head, token) order: one single-axis
        scatter writes every row."""
        if self._flat is None:
            assert self.write is not None
            base = mx.arange(self.rows)[:, None] * n_kv + mx.arange(n_kv)[None, :]
            start = base * self.capacity + self.write[:, None]  # (rows, n_kv)
            self._flat = (start[:, :, None] + mx.arange(self.width)[None, None, :]).reshape(-1)
        return self._flat

    def reserve(self, slot: int, length: int, max_slots: int) -> None:
        """Make room for `length` tokens in `slot` (before an insert)."""
        if slot >= self.slots:
            self.slots = min(max_slots, _round_up(slot + 1, SLOT_STEP))
        if length > self.capacity:
            self.capacity = _round_up(length, T_STEP)

    def shrink(self, longest: int) -> bool:
        """Lower the token capacity when the longest live row needs far less (True if so)."""
        want = _round_up(longest + 1, T_STEP)
        if self.capacity >= 2 * want:
            self.capacity = want
            return True
        return False


class BatchKVCache:
    """One layer's slot buffers; implements the `Cache` protocol for `layout.width`-token steps."""

    def __init__(self, layout: BatchLayout) -> None:
        self.layout = layout
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0  # unused: batched calls always pass per-row position ids

    def make_mask(self, length: int) -> mx.array | None:
        """The step's (rows, 1, width, span) mask; None for one row of one token, which sees
        its whole span: MLX's unmasked one-query attention is ~40% faster (bench/NOTES.md)."""
        if length != self.layout.width:
            raise ValueError(
                f"this step feeds {self.layout.width} token(s) per row (BatchLayout.begin width),"
                f" not {length}; prefill with KVCache"
            )
        assert self.layout.mask is not None, "BatchLayout.begin first"
        return None if self.layout.rows == length == 1 else self.layout.mask

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        lay = self.layout
        self._fit(keys, values)
        assert self.keys is not None and self.values is not None and lay.write is not None
        rows, flat = keys.shape[0], lay.flat_index(keys.shape[1])
        self.keys = scatter_rows(self.keys, flat, keys)
        self.values = scatter_rows(self.values, flat, values)
        span = lay.span
        return self.keys[:rows, :, :span, :], self.values[:rows, :, :span, :]

    def insert(self, slot: int, keys: mx.array, values: mx.array) -> None:
        """Copy one prefilled sequence's (1, n_kv, L, D) keys/values into `slot`."""
        self._fit(keys, values)
        assert self.keys is not None and self.values is not None
        length = keys.shape[2]
        self.keys[slot : slot + 1, :, :length, :] = keys
        self.values[slot : slot + 1, :, :length, :] = values

    def release(self) -> None:
        self.keys = self.values = None

    @property
    def state(self) -> tuple[mx.array, mx.array] | tuple[()]:
        if self.keys is None or self.values is None:
            return ()
        return self.keys, self.values

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes  # type: ignore[union-attr]

    def _fit(self, keys: mx.array, values: mx.array) -> None:
        """Resize the buffers to the layout's capacities, keeping their contents."""
        lay = self.layout
        if self.keys is None:
            self.keys = mx.zeros(
                (lay.slots, keys.shape[1], lay.capacity, keys.shape[3]), keys.dtype
            )
            shape = (lay.slots, values.shape[1], lay.capacity, values.shape[3])
            self.values = mx.zeros(shape, values.dtype)
            return
        assert self.values is not None
        self.keys = resize(self.keys, lay.slots, lay.capacity)
        self.values = resize(self.values, lay.slots, lay.capacity)


def scatter_rows(buf: mx.array, flat: mx.array, new: mx.array) -> mx.array:
    """Write `new` (rows, n_kv, width, X) at the flat (slot, head, position) indices `flat`."""
    shape = buf.shape
    view = buf.reshape(-1, shape[-1])
    view[flat] = new.reshape(-1, shape[-1]).astype(buf.dtype)
    return view.reshape(shape)


def resize(buf: mx.array, slots: int, capacity: int) -> mx.array:
    """A (slots, n_kv, capacity, X) buffer with `buf`'s contents (grown or shrunk)."""
    s, h, t, d = buf.shape
    if t > capacity:  # shrink: copy, so the large buffer can be freed
        buf = mx.contiguous(buf[:, :, :capacity, :])
    elif t < capacity:
        buf = mx.concatenate([buf, mx.zeros((s, h, capacity - t, d), buf.dtype)], axis=2)
    if s < slots:
        buf = mx.concatenate([buf, mx.zeros((slots - s, h, capacity, d), buf.dtype)], axis=0)
    return buf


def make_batch_caches(num_layers: int) -> tuple[BatchLayout, list[BatchKVCache]]:
    layout = BatchLayout()
    return layout, [BatchKVCache(layout) for _ in range(num_layers)]
