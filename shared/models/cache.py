"""Key/value caches, one object per attention layer (the mlx-lm convention)."""

from __future__ import annotations

import mlx.core as mx


class KVCache:
    """Grows in steps of `step` tokens so decoding does not reallocate every token."""

    step = 256

    def __init__(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        prev = self.offset
        needed = prev + keys.shape[2]
        if self.keys is None or needed > self.keys.shape[2]:
            b, n_kv, _, k_dim = keys.shape
            v_dim = values.shape[3]
            n_steps = (self.step + keys.shape[2] - 1) // self.step
            k_shape = (b, n_kv, n_steps * self.step, k_dim)
            v_shape = (b, n_kv, n_steps * self.step, v_dim)
            new_k = mx.zeros(k_shape, keys.dtype)
            new_v = mx.zeros(v_shape, values.dtype)
            if self.keys is not None:
                if prev % self.step != 0:
                    self.keys = self.keys[..., :prev, :]
                    self.values = self.values[..., :prev, :]
                self.keys = mx.concatenate([self.keys, new_k], axis=2)
                self.values = mx.concatenate([self.values, new_v], axis=2)
            else:
                self.keys, self.values = new_k, new_v
        self.offset = needed
        self.keys[..., prev:needed, :] = keys
        self.values[..., prev:needed, :] = values
        return self.keys[..., :needed, :], self.values[..., :needed, :]

    @property
    def state(self) -> tuple[mx.array, mx.array] | tuple[()]:
        if self.keys is None:
            return ()
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return self.keys.nbytes + self.values.nbytes


def make_kv_caches(num_layers: int) -> list[KVCache]:
    return [KVCache() for _ in range(num_layers)]
