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

Stable shapes (issue #10): a wide step, or a `stable` one, attends over whole T_STEPs of keys
(the rest masked), so its shapes change once per 256 tokens, not every step. `CompiledStep`
builds on that: it runs the LM over the slot caches as one `mx.compile`d function per
(rows, span, capacity), the buffers passed in and the updated ones returned. Plain uncompiled
one-token steps attend over the exact span: on the CPU the padding costs up to ~15% at 8 rows
of short contexts (bench/NOTES.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import mlx.core as mx
import numpy as np

T_STEP = 256  # grow the token capacity in steps, like KVCache
SLOT_STEP = 8  # grow the slot capacity in steps


def _round_up(n: int, step: int) -> int:
    return max(step, -(-n // step) * step)


def row_bucket(rows: int, max_slots: int) -> int:
    """Rows a compiled step runs for `rows` live ones: powers of two up to SLOT_STEP, then
    SLOT_STEP multiples (few shapes to compile), never past `max_slots`. Small batches are not
    padded to SLOT_STEP: one row costs less than eight in every matmul."""
    bucket = 1 << max(0, rows - 1).bit_length() if rows < SLOT_STEP else _round_up(rows, SLOT_STEP)
    return max(rows, min(bucket, max_slots))


class BatchLayout:
    """One decode step's geometry, computed once and read by every layer's cache."""

    def __init__(self) -> None:
        self.slots = 0  # slot capacity of every layer's buffers
        self.capacity = 0  # token capacity of every layer's buffers
        self.rows = 0  # rows in this step (slots [0, rows))
        self.width = 1  # tokens per row this step
        self.span = 0  # tokens attended this step: max(lengths[:rows]) + width (or whole T_STEPs)
        self.write: mx.array | None = None  # (rows,) int32 position each row starts writing at
        self.mask: mx.array | None = None  # (rows, 1, width, span) bool: True = visible
        self._flat: mx.array | None = None  # scatter indices, built by the first layer

    def reset(self) -> None:
        """No live rows: forget the capacities (the caches release their buffers)."""
        self.__init__()

    def begin(
        self, lengths: np.ndarray, max_slots: int, width: int = 1, stable: bool = False
    ) -> None:
        """Lay out a step of `width` tokens over rows [0, len(lengths)); grow capacities.
        `stable`: attend over whole T_STEPs even for one token (a compiled step's shapes)."""
        rows = len(lengths)
        self.rows, self.width, self.span = rows, width, int(lengths.max()) + width
        if width > 1 or stable:  # whole T_STEPs, the extra keys masked: MLX CUDA builds its
            # multi-query attention kernel for each key length (~0.6 s each on an H200,
            # bench/NOTES.md), and a compiled step is traced once per shape.
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

    def make_mask(self, length: int) -> mx.array:
        if length != self.layout.width:
            raise ValueError(
                f"this step feeds {self.layout.width} token(s) per row (BatchLayout.begin width),"
                f" not {length}; prefill with KVCache"
            )
        assert self.layout.mask is not None, "BatchLayout.begin first"
        return self.layout.mask

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

    def grow(self) -> None:
        """Resize existing buffers to the layout's capacities now (before a compiled step,
        whose traced function must see buffers of their final shapes)."""
        if self.keys is not None and self.values is not None:
            self.keys = resize(self.keys, self.layout.slots, self.layout.capacity)
            self.values = resize(self.values, self.layout.slots, self.layout.capacity)

    def restore(self, state: Sequence[mx.array]) -> None:
        """Take buffers back in `state`'s order (what a compiled step returns)."""
        self.keys, self.values = state

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


class CompiledStep:
    """`forward(tokens, positions) -> logits` over slot caches as one `mx.compile`d function.

    A one-token decode step is about a thousand small ops for a 28-layer LM (issue #10: launch
    and graph-building bound on the H100). Compiled, MLX replays a traced graph (no Python per
    op) and fuses the elementwise chains. The buffers, the layout's write positions and mask
    are the function's inputs and the updated buffers its outputs, so nothing stale is captured
    in the trace.
    Every Python number the trace reads (rows, span, capacity, slots) is an input's shape, so
    MLX's per-shape cache of traces never replays one for the wrong geometry.
    """

    # MLX keeps every trace until its compiled function is dropped: ~2.4 MB each for 28 layers
    # (bench/NOTES.md). A long-running server meets a new (rows, span, capacity) every 256
    # tokens of its longest row, so past this many shapes the traces start over.
    MAX_TRACES = 64

    def __init__(self, forward: Callable[[mx.array, mx.array], mx.array], caches: list) -> None:
        self.forward, self.caches = forward, caches
        self.layout: BatchLayout = caches[0].layout
        self._fn = mx.compile(self._traced)
        self.shapes: set[tuple] = set()  # the input shapes (and dtypes) traced by `_fn`

    def __call__(self, tokens: mx.array, positions: mx.array) -> mx.array:
        lay = self.layout
        if tokens.shape[0] != lay.rows or tokens.shape[1] != lay.width:
            raise ValueError(f"tokens {tokens.shape} do not match the layout's rows and width")
        for cache in self.caches:
            cache.grow()
        sizes = [len(cache.state) for cache in self.caches]
        if not all(sizes):
            raise ValueError("a compiled step needs every cache's buffers (insert a row first)")
        flat = [a for cache in self.caches for a in cache.state]
        assert lay.write is not None and lay.mask is not None, "BatchLayout.begin first"
        shapes = (tokens.shape, tokens.dtype, positions.dtype, lay.mask.shape)
        self._bound((*shapes, *(a.shape for a in flat)))
        out = self._fn(tokens, positions, lay.write, lay.mask, *flat)
        self._restore(out[1:], sizes)
        return out[0]

    def _bound(self, shapes: tuple) -> None:
        """Start the traces over before a new shape would exceed MAX_TRACES (dropping the
        compiled function frees its traces)."""
        if shapes in self.shapes:
            return
        if len(self.shapes) >= self.MAX_TRACES:
            self._fn = mx.compile(self._traced)
            self.shapes.clear()
        self.shapes.add(shapes)

    def _traced(self, tokens: mx.array, positions: mx.array, *arrays: mx.array) -> list[Any]:
        lay, (write, mask), flat = self.layout, arrays[:2], arrays[2:]
        saved = lay.write, lay.mask, [cache.state for cache in self.caches]
        lay.write, lay.mask, lay._flat = write, mask, None
        self._restore(flat, [len(s) for s in saved[2]])
        try:
            logits = self.forward(tokens, positions)
            return [logits, *(a for cache in self.caches for a in cache.state)]
        finally:  # the tracer arrays must not outlive the trace
            lay.write, lay.mask, lay._flat = saved[0], saved[1], None
            for cache, state in zip(self.caches, saved[2], strict=True):
                cache.restore(state)

    def _restore(self, flat: Sequence[mx.array], sizes: list[int]) -> None:
        start = 0
        for cache, n in zip(self.caches, sizes, strict=True):
            cache.restore(flat[start : start + n])
            start += n


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
