"""The encoder holds only vision weights and the decoder only language weights."""

from __future__ import annotations

import gc

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from shared.api import load


def param_bytes(module: nn.Module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(module.parameters()))


def materialised_by(fn) -> tuple[object, int]:
    gc.collect()
    mx.clear_cache()
    before = mx.get_active_memory()
    out = fn()
    gc.collect()
    return out, mx.get_active_memory() - before


def test_components_load_separately(checkpoint_factory):
    path = checkpoint_factory("qwen2_5_vl", "hf")
    vision_only, vision_mem = materialised_by(lambda: load(path, components=["vision"]))
    assert vision_only.language is None and vision_only.vision is not None
    language_only, language_mem = materialised_by(lambda: load(path, components=["language"]))
    assert language_only.vision is None and language_only.language is not None

    v_bytes, l_bytes = param_bytes(vision_only.vision), param_bytes(language_only.language)
    # Each process holds its own half (plus allocator rounding), never the other half.
    assert v_bytes <= vision_mem < v_bytes + l_bytes // 2
    assert l_bytes <= language_mem < l_bytes + v_bytes // 2
