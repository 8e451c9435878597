"""Tiny random checkpoints in the real on-disk formats, for the test suite.

`make_checkpoint(family, out_dir, layout, size=...)` writes one model directory:
- "hf": transformers 5 `save_pretrained` (nested text/vision configs, `model.visual.*`,
  `model.language_model.*`), tokenizer saved by transformers 5 (`chat_template.jinja`);
- "hf-legacy": the files published on the Hub (transformers-4 era): text fields at the config
  root, `rope_scaling` instead of `rope_parameters`, `visual.*` / `model.*` / `lm_head.*` keys,
  chat template inside tokenizer_config.json;
- "mlx", "mlx-4bit", "mlx-8bit": the mlx-community layout, converted from "hf-legacy" by
  `mlx_convert.convert` as mlx-vlm / mlx-lm `convert` would.

Sizes (`SIZES`): "tiny" (the test default; a few hundred kB) and "small" (LM 512 wide x 8
layers, a 4-block ViT; ~27M parameters), for benchmarks that need real-sized matmuls while
staying fast on a CPU. All layouts of one (family, seed, size) hold the same weights. torch and
transformers are imported lazily: they are test-only dependencies.
"""

from __future__ import annotations

import copy
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import mlx_convert
from .templates import TEMPLATES
from .tokenizer import special_token_ids, vocab_size, write_tokenizer

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen2", "qwen3", "llama")
VLM_FAMILIES = ("qwen2_vl", "qwen2_5_vl")
LAYOUTS = ("hf", "hf-legacy", "mlx", "mlx-4bit", "mlx-8bit")
MLX_LAYOUTS = {"mlx": None, "mlx-4bit": (64, 4), "mlx-8bit": (64, 8)}  # (group_size, bits)
DTYPES = ("float32", "float16", "bfloat16")

ARCHITECTURES = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "llama": "LlamaForCausalLM",
}
# Which published model each family's tying mirrors: Qwen2-VL-2B, Qwen2.5-VL-7B, Qwen2.5-7B,
# Qwen3-0.6B, Llama-3.2-1B. Both tied and untied heads are thus exercised.
TIED = {"qwen2_vl": True, "qwen2_5_vl": False, "qwen2": False, "qwen3": True, "llama": True}

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
MIN_PIXELS = 56 * 56
MAX_PIXELS = 224 * 224
VIDEO_MIN_PIXELS = 56 * 56
VIDEO_MAX_PIXELS = 112 * 112

# Tiny language model shared by every family.
HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, INTERMEDIATE = 64, 2, 4, 2, 16, 128
MROPE_SECTION = [2, 3, 3]  # sums to HEAD_DIM / 2


@dataclass(frozen=True)
class Size:
    """Dimensions of one model-size preset (the language model is shared by every family)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int  # hidden / heads (Qwen2 derives it; Llama and Qwen3 store it)
    intermediate: int
    mrope_section: tuple[int, int, int]  # sums to head_dim / 2
    vision_depth: int
    vision_hidden: int  # Qwen2.5-VL `hidden_size`, Qwen2-VL `embed_dim`
    vision_heads: int
    vision_intermediate: int  # Qwen2.5-VL SwiGLU width
    vision_mlp_ratio: int  # Qwen2-VL MLP width = ratio x embed_dim
    fullatt_block_indexes: tuple[int, ...]  # Qwen2.5-VL blocks without windowing
    min_pixels: int
    max_pixels: int
    video_min_pixels: int
    video_max_pixels: int


SIZES: dict[str, Size] = {
    "tiny": Size(
        hidden=HIDDEN,
        layers=LAYERS,
        heads=HEADS,
        kv_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        intermediate=INTERMEDIATE,
        mrope_section=(MROPE_SECTION[0], MROPE_SECTION[1], MROPE_SECTION[2]),
        vision_depth=2,
        vision_hidden=32,
        vision_heads=2,
        vision_intermediate=64,
        vision_mlp_ratio=4,
        fullatt_block_indexes=(1,),
        min_pixels=MIN_PIXELS,
        max_pixels=MAX_PIXELS,
        video_min_pixels=VIDEO_MIN_PIXELS,
        video_max_pixels=VIDEO_MAX_PIXELS,
    ),
    # A benchmark model: real-sized matmuls, fast on a CPU. M-RoPE keeps Qwen's 2:3:3 split
    # ([16, 24, 24] is for head_dim 128; here head_dim is 64). max_pixels is 1280 * 28 * 28,
    # so a 448x448 image is not resized (a 32x32 patch grid, 256 merged tokens).
    "small": Size(
        hidden=512,
        layers=8,
        heads=8,
        kv_heads=2,
        head_dim=64,
        intermediate=1408,
        mrope_section=(8, 12, 12),
        vision_depth=4,
        vision_hidden=256,
        vision_heads=4,
        vision_intermediate=512,
        vision_mlp_ratio=2,
        fullatt_block_indexes=(3,),
        min_pixels=MIN_PIXELS,
        max_pixels=1280 * 28 * 28,
        video_min_pixels=VIDEO_MIN_PIXELS,
        video_max_pixels=224 * 224,
    ),
}


def _size(size: str) -> Size:
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {tuple(SIZES)}")
    return SIZES[size]


def tokenizer_style(family: str) -> str:
    _check_family(family)
    return "llama3" if family == "llama" else "qwen"


def token_ids(family: str) -> dict[str, int]:
    """Content -> id of every added token in the family's tokenizer."""
    return special_token_ids(tokenizer_style(family))


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def _qwen_root(family: str, dtype: str, size: Size) -> dict[str, Any]:
    ids = token_ids(family)
    return {
        "architectures": [ARCHITECTURES[family]],
        "attention_dropout": 0.0,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "hidden_act": "silu",
        "hidden_size": size.hidden,
        "initializer_range": 0.02,
        "intermediate_size": size.intermediate,
        "max_position_embeddings": 32768,
        "max_window_layers": size.layers,
        "model_type": family,
        "num_attention_heads": size.heads,
        "num_hidden_layers": size.layers,
        "num_key_value_heads": size.kv_heads,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": TIED[family],
        "torch_dtype": dtype,
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": vocab_size("qwen"),
    }


def _vision_config(family: str, size: Size) -> dict[str, Any]:
    if family == "qwen2_vl":
        # Qwen2-VL: `embed_dim` is the ViT width, `hidden_size` the LM width (merger output).
        return {
            "depth": size.vision_depth,
            "embed_dim": size.vision_hidden,
            "mlp_ratio": size.vision_mlp_ratio,
            "num_heads": size.vision_heads,
            "in_chans": 3,
            "hidden_size": size.hidden,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "temporal_patch_size": 2,
        }
    return {
        "depth": size.vision_depth,
        "hidden_act": "silu",
        "hidden_size": size.vision_hidden,
        "intermediate_size": size.vision_intermediate,
        "num_heads": size.vision_heads,
        "in_chans": 3,
        "out_hidden_size": size.hidden,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "window_size": 112,
        "fullatt_block_indexes": list(size.fullatt_block_indexes),
        "tokens_per_second": 2,
        "temporal_patch_size": 2,
    }


def legacy_config(family: str, dtype: str = "float32", size: str = "tiny") -> dict[str, Any]:
    """config.json as published on the Hub (transformers-4 style), for the `size` model."""
    _check_family(family)
    dims = _size(size)
    if family in VLM_FAMILIES:
        ids = token_ids(family)
        cfg = _qwen_root(family, dtype, dims)
        cfg.update(
            {
                "vision_start_token_id": ids["<|vision_start|>"],
                "vision_end_token_id": ids["<|vision_end|>"],
                "vision_token_id": ids["<|vision_pad|>"],
                "image_token_id": ids["<|image_pad|>"],
                "video_token_id": ids["<|video_pad|>"],
                "vision_config": _vision_config(family, dims),
                "rope_scaling": {"type": "mrope", "mrope_section": list(dims.mrope_section)},
                "transformers_version": "4.49.0",
            }
        )
    elif family == "qwen2":
        cfg = _qwen_root(family, dtype, dims)
        cfg.update({"transformers_version": "4.43.1"})
    elif family == "qwen3":
        cfg = _qwen_root(family, dtype, dims)
        cfg.update(
            {
                "attention_bias": False,
                "head_dim": dims.head_dim,
                "max_position_embeddings": 40960,
                "rope_scaling": None,
                "sliding_window": None,
                "transformers_version": "4.51.0",
            }
        )
    else:
        cfg = _llama_config(dtype, dims)
    return dict(sorted(cfg.items()))


def _llama_config(dtype: str, size: Size) -> dict[str, Any]:
    ids = token_ids("llama")
    return {
        "architectures": [ARCHITECTURES["llama"]],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": ids["<|begin_of_text|>"],
        "eos_token_id": [ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]],
        "head_dim": size.head_dim,
        "hidden_act": "silu",
        "hidden_size": size.hidden,
        "initializer_range": 0.02,
        "intermediate_size": size.intermediate,
        "max_position_embeddings": 131072,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": size.heads,
        "num_hidden_layers": size.layers,
        "num_key_value_heads": size.kv_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        # Llama 3.2 values; with head_dim 16 (tiny) the rotary bands fall in all three regimes
        # (kept, smoothly interpolated, divided by `factor`).
        "rope_scaling": {
            "factor": 32.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "rope_theta": 500000.0,
        "tie_word_embeddings": TIED["llama"],
        "torch_dtype": dtype,
        "transformers_version": "4.45.0",
        "use_cache": True,
        "vocab_size": vocab_size("llama3"),
    }


def generation_config(family: str) -> dict[str, Any]:
    """generation_config.json: eos ids as published; no sampling defaults (greedy)."""
    ids = token_ids(family)
    if family == "llama":
        return {
            "bos_token_id": ids["<|begin_of_text|>"],
            "eos_token_id": [ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]],
            "transformers_version": "4.45.0",
        }
    eot = ids["<|endoftext|>"]
    return {
        "bos_token_id": eot,
        "eos_token_id": [ids["<|im_end|>"], eot],
        "pad_token_id": eot,
        "transformers_version": "4.49.0",
    }


def _processor_class(family: str) -> str:
    return "Qwen2VLProcessor" if family == "qwen2_vl" else "Qwen2_5_VLProcessor"


def preprocessor_config(family: str, *, legacy: bool, size: str = "tiny") -> dict[str, Any]:
    dims = _size(size)
    common = {
        "image_mean": OPENAI_CLIP_MEAN,
        "image_std": OPENAI_CLIP_STD,
        "image_processor_type": "Qwen2VLImageProcessor",
        "merge_size": 2,
        "patch_size": 14,
        "processor_class": _processor_class(family),
        "temporal_patch_size": 2,
    }
    if legacy:  # the Hub file: min/max pixels as flat keys
        return {**common, "min_pixels": dims.min_pixels, "max_pixels": dims.max_pixels}
    return {
        **common,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"longest_edge": dims.max_pixels, "shortest_edge": dims.min_pixels},
    }


def video_preprocessor_config(family: str, size: str = "tiny") -> dict[str, Any]:
    dims = _size(size)
    return {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "do_sample_frames": True,
        "fps": 2.0,
        "image_mean": OPENAI_CLIP_MEAN,
        "image_std": OPENAI_CLIP_STD,
        "max_frames": 16,
        "max_pixels": dims.video_max_pixels,
        "merge_size": 2,
        "min_frames": 2,
        "min_pixels": dims.video_min_pixels,
        "patch_size": 14,
        "processor_class": _processor_class(family),
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"longest_edge": dims.video_max_pixels, "shortest_edge": dims.video_min_pixels},
        "temporal_patch_size": 2,
        "video_processor_type": "Qwen2VLVideoProcessor",
    }


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
