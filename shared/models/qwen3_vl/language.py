"""Qwen3-VL language model: Qwen3 layers, interleaved M-RoPE, DeepStack injection.

Two differences from the Qwen2-VL language model:
* M-RoPE bands are interleaved (T H W T H W ... T), not in three consecutive groups
  (transformers' `Qwen3VLTextRotaryEmbedding.recomposition_frequencies`);
* DeepStack: level i of `deepstack_embeds` (levels, L, D) is added to the hidden states after
  layer i. Its rows are zero at text tokens (adding zero is exact), so the dense tensor is
  sliced per prefill chunk like any other per-token input (`PrefillInputs.extras`). The layer
  loop stays the shared `transformer.TransformerModel`'s (caches, capture hooks).
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np

from shared.models import transformer
from shared.models.base import Cache
from shared.models.qwen3_vl.config import TextArgs
from shared.models.rope import RoPE, RotaryPositions, cos_sin


def interleaved_rows(half_dim: int, section: tuple[int, ...]) -> np.ndarray:
    """Which position row (0 T, 1 H, 2 W) drives each of the head_dim/2 frequency bands."""
    rows = np.zeros(half_dim, dtype=np.int32)
    for axis in (1, 2):  # H takes bands 1, 4, 7, ...; W 2, 5, 8, ...; each up to 3 * section
        rows[axis : min(3 * section[axis], half_dim) : 3] = axis
    return rows


class InterleavedMRoPE(RoPE):
    """Qwen3-VL's M-RoPE: `position_ids` (3, B, L) as for Qwen2-VL's `MRoPE`; None or (B, L)
    (text, decode steps: equal rows) take the 1-D paths."""

    def __init__(self, dims: int, inv_freq: mx.array, mrope_section: tuple[int, ...]) -> None:
        super().__init__(dims, inv_freq)
        self.mrope_section = tuple(mrope_section)
        self._rows = mx.array(interleaved_rows(dims // 2, self.mrope_section))

    def positions(
        self, length: int, offset: int, position_ids: mx.array | None = None
    ) -> RotaryPositions:
        if position_ids is None or position_ids.ndim == 2:
            return super().positions(length, offset, position_ids)
        angles = position_ids[..., None].astype(mx.float32) * self._inv_freq  # (3, B, L, D/2)
        rows = self._rows
        picked = mx.where(rows == 1, angles[1], mx.where(rows == 2, angles[2], angles[0]))
        cos, sin = cos_sin(picked)
        return RotaryPositions(cos=cos, sin=sin)


class DeepStackLayer(transformer.DecoderLayer):
    """A decoder layer that adds its DeepStack level (when one is set) to its output."""

    def __init__(self, args: TextArgs) -> None:
        super().__init__(args)
        self.set_level(None)

    def set_level(self, level: mx.array | None) -> None:
        # A plain attribute, not a Module entry: never a parameter, never saved or loaded.
        object.__setattr__(self, "_level", level)

    def __call__(self, x: mx.array, *args: Any) -> mx.array:
        h = super().__call__(x, *args)
        return h if self._level is None else h + self._level.astype(h.dtype)[None]


class TextModel(transformer.TransformerModel):
    """The shared decoder stack (its layer loop, caches and hooks unchanged) with DeepStack:
    level i is handed to layer i for the length of one call."""

    layer_class = DeepStackLayer

    def __call__(
        self,
        inputs: mx.array | None,
        cache: list[Cache] | None = None,
        input_embeddings: mx.array | None = None,
        position_ids: mx.array | None = None,
        deepstack_embeds: mx.array | None = None,
    ) -> mx.array:
        levels = 0 if deepstack_embeds is None else deepstack_embeds.shape[0]
        if levels > len(self.layers):
            raise ValueError(f"{levels} DeepStack levels for {len(self.layers)} layers")
        for i in range(levels):
            self.layers[i].set_level(deepstack_embeds[i])
        try:
            return super().__call__(inputs, cache, input_embeddings, position_ids)
        finally:
            for i in range(levels):
                self.layers[i].set_level(None)


class LanguageModel(transformer.Model):
    """Implements the `LanguageModel` protocol; weights as `model.*` and `lm_head`."""

    def __init__(self, args: TextArgs) -> None:
        _, section = args.mrope()
        rope = InterleavedMRoPE(args.head_dim, args.inv_freq(), section)
        super().__init__(args, model=TextModel(args, rope))

    def __call__(
        self,
        inputs: mx.array | None,
        cache: list[Cache] | None = None,
        *,
        input_embeddings: mx.array | None = None,
        position_ids: mx.array | None = None,
        deepstack_embeds: mx.array | None = None,
    ) -> mx.array:
        return self.logits(
            self.model(inputs, cache, input_embeddings, position_ids, deepstack_embeds)
        )
