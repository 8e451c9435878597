"""Tiny random checkpoints in the real on-disk formats, for the test suite.

`make_checkpoint(family, out_dir, layout, size=...)` writes one model directory:
- "hf": transformers 5 `save_pretrained` (nested text/vision configs, `model.visual.*`,
  `model.language_model.*`), tokenizer saved by transformers 5 (`chat_template.jinja`);
- "hf-legacy": the files published on the Hub (transformers-4 era): text fields at the config
  root, `rope_scaling` instead of `rope_parameters`, `visual.*` / `model.*` / `lm_head.*` keys,
  chat template inside tokenizer_config.json;
- "mlx", "mlx-4bit", "mlx-8bit": the mlx-community layout, converted from "hf-legacy" by
  `mlx_convert.convert` as mlx-vlm / mlx-lm `convert` would.

Families are in `families.py`, size presets (`SIZES`) in `sizes.py`, the JSON configs in
`configs.py`; their names are re-exported here. All layouts of one (family, seed, size) hold the
same weights. torch and transformers are imported lazily: they are test-only dependencies.
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path
from typing import Any

from . import mlx_convert
from .configs import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    generation_config,
    legacy_config,
    preprocessor_config,
    video_preprocessor_config,
)
from .families import (
    ARCHITECTURES,
    FAMILIES,
    TIED,
    VLM_FAMILIES,
    _check_family,
    token_ids,
    tokenizer_style,
)
from .sizes import (
    HEAD_DIM,
    HEADS,
    HIDDEN,
    INTERMEDIATE,
    KV_HEADS,
    LAYERS,
    MAX_PIXELS,
    MIN_PIXELS,
    MROPE_SECTION,
    SIZES,
    VIDEO_MAX_PIXELS,
    VIDEO_MIN_PIXELS,
    Size,
    _size,
)
from .templates import TEMPLATES
from .tokenizer import write_tokenizer

__all__ = [
    "ARCHITECTURES",
    "DTYPES",
    "FAMILIES",
    "HEADS",
    "HEAD_DIM",
    "HIDDEN",
    "INTERMEDIATE",
    "KV_HEADS",
    "LAYERS",
    "LAYOUTS",
    "MAX_PIXELS",
    "MIN_PIXELS",
    "MLX_LAYOUTS",
    "MROPE_SECTION",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "SIZES",
    "TIED",
    "VIDEO_MAX_PIXELS",
    "VIDEO_MIN_PIXELS",
    "VLM_FAMILIES",
    "Size",
    "_write_sidecars",
    "build_torch_model",
    "convert_checkpoint",
    "generation_config",
    "legacy_config",
    "make_checkpoint",
    "preprocessor_config",
    "token_ids",
    "tokenizer_style",
    "video_preprocessor_config",
]

LAYOUTS = ("hf", "hf-legacy", "mlx", "mlx-4bit", "mlx-8bit")
MLX_LAYOUTS = {"mlx": None, "mlx-4bit": (64, 4), "mlx-8bit": (64, 8)}  # (group_size, bits)
DTYPES = ("float32", "float16", "bfloat16")


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _write_sidecars(family: str, out_dir: Path, *, legacy: bool, size: str) -> None:
    """Tokenizer, chat template, generation and (VLM) pre-processor configs."""
    write_tokenizer(tokenizer_style(family), out_dir, TEMPLATES[family], legacy=legacy)
    _write_json(out_dir / "generation_config.json", generation_config(family))
    if family in VLM_FAMILIES:
        _write_json(
            out_dir / "preprocessor_config.json",
            preprocessor_config(family, legacy=legacy, size=size),
        )
        _write_json(
            out_dir / "video_preprocessor_config.json", video_preprocessor_config(family, size)
        )
        if legacy:  # the Hub VLM repos also ship the processor's template separately
            _write_json(out_dir / "chat_template.json", {"chat_template": TEMPLATES[family]})


def build_torch_model(family: str, *, seed: int = 0, dtype: str = "float32", size: str = "tiny"):
    """The transformers model with deterministic, non-degenerate random weights."""
    import torch
    import transformers

    cfg_dict = copy.deepcopy(legacy_config(family, dtype, size))
    cfg_dict.pop("architectures")
    cfg_dict.pop("transformers_version")
    config_cls = transformers.CONFIG_MAPPING[family]
    config = config_cls(**cfg_dict)
    torch.manual_seed(seed)
    model = getattr(transformers, ARCHITECTURES[family])(config)
    _randomize(model, seed)
    return model.to(getattr(torch, dtype)).eval()


def _randomize(model, seed: int) -> None:
    """Re-draw every parameter with scales that keep logits spread out.

    transformers' default init (std 0.02, norms at 1, biases at 0) gives near-tied logits and
    would let a loader that drops biases or norm weights pass; here matrices get
    N(0, (1.5 / sqrt(fan_in))^2), norm weights 1 + N(0, 0.1^2), biases N(0, 0.1^2).
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(noise * (1.5 / fan_in**0.5))
            elif name.endswith("bias"):
                p.copy_(noise * 0.1)
            else:  # RMSNorm / LayerNorm scales
                p.copy_(1.0 + noise * 0.1)


def _legacy_key(family: str, key: str) -> str:
    """transformers-5 state-dict key -> the Hub (transformers-4) key."""
    if family not in VLM_FAMILIES:
        return key
    if key.startswith("model.visual."):
        return key[len("model.") :]
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model.") :]
    return key


def _save_hf(model, family: str, out_dir: Path, size: str) -> None:
    # transformers 5.x defaults to re-mapping keys to the legacy names on save; keep its own.
    model.save_pretrained(str(out_dir), save_original_format=False)
    _write_sidecars(family, out_dir, legacy=False, size=size)


def _save_hf_legacy(model, family: str, out_dir: Path, dtype: str, size: str) -> None:
    from safetensors.torch import save_file

    state = model.state_dict()
    if TIED[family]:  # as published: tied checkpoints store no lm_head
        state.pop("lm_head.weight", None)
    tensors = {_legacy_key(family, k): v.contiguous() for k, v in sorted(state.items())}
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    _write_json(out_dir / "config.json", legacy_config(family, dtype, size))
    _write_sidecars(family, out_dir, legacy=True, size=size)


def convert_checkpoint(src: Path, out_dir: Path, layout: str) -> Path:
    """Convert an "hf-legacy" directory to one of the mlx layouts (as mlx_vlm/mlx_lm convert)."""
    if layout not in MLX_LAYOUTS:
        raise ValueError(f"layout {layout!r} is not an mlx layout {tuple(MLX_LAYOUTS)}")
    quant = MLX_LAYOUTS[layout]
    q_group, q_bits = quant if quant else (64, 4)
    return mlx_convert.convert(
        Path(src), Path(out_dir), quantize=quant is not None, q_group_size=q_group, q_bits=q_bits
    )


def make_checkpoint(
    family: str,
    out_dir: Path,
    layout: str = "hf",
    *,
    seed: int = 0,
    dtype: str = "float32",
    size: str = "tiny",
) -> Path:
    """Write a random `family` checkpoint of `size` (see `SIZES`) in `layout` to `out_dir`;
    return `out_dir`."""
    _check_family(family)
    _size(size)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {DTYPES}")
    out_dir = Path(out_dir)
    if layout in MLX_LAYOUTS:
        with tempfile.TemporaryDirectory() as tmp:
            src = make_checkpoint(family, Path(tmp), "hf-legacy", seed=seed, dtype=dtype, size=size)
            return convert_checkpoint(src, out_dir, layout)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = build_torch_model(family, seed=seed, dtype=dtype, size=size)
    if layout == "hf":
        _save_hf(model, family, out_dir, size)
    else:
        _save_hf_legacy(model, family, out_dir, dtype, size)
    return out_dir
