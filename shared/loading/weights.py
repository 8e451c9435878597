"""Read safetensors lazily, map every published naming to the canonical one, load into modules.

`mx.load` is lazy: a tensor is read from disk only when evaluated, so a process that keeps
only the vision (or only the language) tensors never materialises the others.
"""

from __future__ import annotations

import glob
import re
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from shared.loading.config import Quantization
from shared.models.quantized import quantize

# (pattern, replacement) applied in order; the first match wins.
_VLM_RENAMES: list[tuple[re.Pattern[str], str]] = [
    # transformers-5: model.visual.*, model.language_model.*
    (re.compile(r"^model\.visual\."), "vision_tower."),
    (re.compile(r"^model\.language_model\."), "language_model.model."),
    # Gemma 3 (transformers-5): model.vision_tower.vision_model.* (Hub/mlx: vision_tower.*)
    (re.compile(r"^model\.vision_tower\."), "vision_tower."),
    # Qwen2-Audio (transformers-5 `model.audio_tower.*`, Hub and mlx `audio_tower.*`): the audio
    # encoder and its projector are the encoder service's tower, so they live under vision_tower.
    (re.compile(r"^(?:model\.)?(audio_tower|multi_modal_projector)\."), r"vision_tower.\1."),
    # SmolVLM / Idefics3 (Hub and transformers-5 `model.*`, mlx-community bare): the SigLIP
    # tower and the connector are the encoder's; `model.text_model.*` is the Llama.
    (re.compile(r"^(?:model\.)?(vision_model|connector)\."), r"vision_tower.\1."),
    (re.compile(r"^model\.text_model\."), "language_model.model."),
    # transformers-4 published checkpoints: visual.*, model.*, lm_head.*
    (re.compile(r"^visual\."), "vision_tower."),
    (re.compile(r"^model\."), "language_model.model."),
    (re.compile(r"^lm_head\."), "language_model.lm_head."),
]
_TEXT_RENAMES: list[tuple[re.Pattern[str], str]] = [
    # transformers-5 may save a text model under model.language_model.* too.
    (re.compile(r"^model\.language_model\."), "model."),
    (re.compile(r"^language_model\."), ""),
]

VISION_PREFIX = "vision_tower."
LANGUAGE_PREFIX = "language_model."


def read_weights(model_path: Path) -> dict[str, mx.array]:
    files = sorted(glob.glob(str(Path(model_path) / "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_path}")
    weights: dict[str, mx.array] = {}
    for f in files:
        weights.update(mx.load(f))
    return weights


def _rename(key: str, renames: list[tuple[re.Pattern[str], str]]) -> str:
    for pattern, repl in renames:
        if pattern.match(key):
            return pattern.sub(repl, key, count=1)
    return key


def canonical_vlm_names(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Rename a VLM checkpoint's keys to `vision_tower.*` / `language_model.*`."""
    out = {}
    for key, value in weights.items():
        if key.startswith((VISION_PREFIX, LANGUAGE_PREFIX)):
            out[key] = value
        else:
            out[_rename(key, _VLM_RENAMES)] = value
    return out


def canonical_text_names(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    return {_rename(k, _TEXT_RENAMES): v for k, v in weights.items()}


def take_prefix(weights: dict[str, mx.array], prefix: str) -> dict[str, mx.array]:
    n = len(prefix)
    return {k[n:]: v for k, v in weights.items() if k.startswith(prefix)}


def cast_floats(weights: dict[str, mx.array], dtype: mx.Dtype | None) -> dict[str, mx.array]:
    if dtype is None:
        return weights
    return {
        k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()
    }


def load_module(
    module: nn.Module,
    weights: dict[str, mx.array],
    quant: Quantization | None,
    sanitize: Callable[[dict[str, mx.array]], dict[str, mx.array]] | None = None,
) -> nn.Module:
    """Sanitize, quantize the layers the checkpoint stores quantized, load strictly, evaluate."""
    if sanitize is not None:
        weights = sanitize(weights)
    if quant is not None:
        # Quantize exactly the layers the checkpoint stores quantized (mlx-lm's rule):
        # converters leave small or oddly shaped layers in floating point.
        quantize(module, quant, lambda path, _m: f"{path}.scales" in weights)
    module.load_weights(list(weights.items()), strict=True)
    mx.eval(module.parameters())
    module.eval()
    return module
