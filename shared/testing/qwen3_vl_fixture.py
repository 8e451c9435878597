"""Tiny random Qwen3-VL checkpoints in the real on-disk layouts, for the test suite.

`make_qwen3_vl_checkpoint(out_dir, layout)` writes one model directory:
- "hf": transformers 5 `save_pretrained` (nested `text_config` / `vision_config`,
  `rope_parameters`; `model.visual.*`, `model.language_model.*`), tokenizer as transformers 5
  saves it (`chat_template.jinja`);
- "hf-legacy": what the Hub repos hold (transformers 4.57): the same nesting and weight names,
  `rope_scaling` + `rope_theta` in `text_config`, `torch_dtype`, template in
  tokenizer_config.json and chat_template.json;
- "mlx", "mlx-4bit", "mlx-8bit": the mlx-community layout, converted from "hf-legacy" by
  `mlx_convert.convert` (`vision_tower.*`, `language_model.*`; the vision tower, DeepStack
  mergers included, never quantized).

Shapes: a 3-block ViT (width 32, 2 heads, patch 16, an 8x8 learned position grid) with DeepStack
taps after blocks 0 and 1, and a 3-layer Qwen3 LM (width 64, head_dim 16, M-RoPE section
[2, 3, 3] interleaved), so both DeepStack levels land in the LM.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from .checkpoint_io import (
    check_layout,
    mlx_convert_layout,
    randomized,
    save_safetensors,
    via_hf_checkpoint,
    write_json,
)
from .configs import generation_config
from .fixtures import MLX_LAYOUTS
from .templates import QWEN3_VL_TEMPLATE
from .tokenizer import special_token_ids, vocab_size, write_tokenizer

LAYOUTS = ("hf", "hf-legacy", "mlx", "mlx-4bit", "mlx-8bit")
MEAN_STD = [0.5, 0.5, 0.5]
IMAGE_PIXELS = (64 * 64, 256 * 256)  # (min, max) per image
VIDEO_PIXELS = (64 * 64, 8 * 64 * 64)  # (min, max) over frames x height x width
MROPE_SECTION = [2, 3, 3]

TEMPLATE = QWEN3_VL_TEMPLATE


def model_config(dtype: str = "float32") -> dict[str, Any]:
    """config.json as the Hub holds it (transformers 4.57 style)."""
    ids = special_token_ids("qwen")
    text = {
        "model_type": "qwen3_vl_text",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "head_dim": 16,
        "hidden_act": "silu",
        "hidden_size": 64,
        "initializer_range": 0.02,
        "intermediate_size": 128,
        "max_position_embeddings": 32768,
        "num_attention_heads": 4,
        "num_hidden_layers": 3,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6,
        "rope_scaling": {
            "mrope_interleaved": True,
            "mrope_section": MROPE_SECTION,
            "rope_type": "default",
        },
        "rope_theta": 5000000,
        "torch_dtype": dtype,
        "use_cache": True,
        "vocab_size": vocab_size("qwen"),
    }
    vision = {
        "model_type": "qwen3_vl",
        "deepstack_visual_indexes": [0, 1],
        "depth": 3,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": 32,
        "in_channels": 3,
        "initializer_range": 0.02,
        "intermediate_size": 64,
        "num_heads": 2,
        "num_position_embeddings": 64,
        "out_hidden_size": 64,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    return {
        "architectures": ["Qwen3VLForConditionalGeneration"],
        "image_token_id": ids["<|image_pad|>"],
        "model_type": "qwen3_vl",
        "text_config": text,
        "tie_word_embeddings": True,  # as Qwen3-VL-2B / 4B
        "transformers_version": "4.57.0",
        "video_token_id": ids["<|video_pad|>"],
        "vision_config": vision,
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
    }


def preprocessor_config() -> dict[str, Any]:
    return {
        "image_mean": MEAN_STD,
        "image_processor_type": "Qwen2VLImageProcessorFast",
        "image_std": MEAN_STD,
        "merge_size": 2,
        "patch_size": 16,
        "processor_class": "Qwen3VLProcessor",
        "size": {"longest_edge": IMAGE_PIXELS[1], "shortest_edge": IMAGE_PIXELS[0]},
        "temporal_patch_size": 2,
    }


def video_preprocessor_config() -> dict[str, Any]:
    return {
        "do_sample_frames": True,
        "fps": 2,
        "image_mean": MEAN_STD,
        "image_std": MEAN_STD,
        "max_frames": 16,
        "merge_size": 2,
        "min_frames": 2,
        "patch_size": 16,
        "processor_class": "Qwen3VLProcessor",
        "size": {"longest_edge": VIDEO_PIXELS[1], "shortest_edge": VIDEO_PIXELS[0]},
        "temporal_patch_size": 2,
        "video_processor_type": "Qwen3VLVideoProcessor",
    }


def build_torch_model(seed: int = 0, dtype: str = "float32"):
    """transformers' Qwen3VLForConditionalGeneration with spread-out random weights."""
    import transformers

    cfg = copy.deepcopy(model_config(dtype))
    for key in ("architectures", "transformers_version"):
        cfg.pop(key)
    model_cls = transformers.Qwen3VLForConditionalGeneration
    return randomized(model_cls, transformers.Qwen3VLConfig(**cfg), seed, dtype)


def _sidecars(out_dir: Path, legacy: bool) -> None:
    write_tokenizer("qwen", out_dir, TEMPLATE, legacy=legacy)
    write_json(out_dir / "generation_config.json", generation_config("qwen2_vl"))
    write_json(out_dir / "preprocessor_config.json", preprocessor_config())
    write_json(out_dir / "video_preprocessor_config.json", video_preprocessor_config())
    if legacy:
        write_json(out_dir / "chat_template.json", {"chat_template": TEMPLATE})


def _save_legacy(model, out_dir: Path, dtype: str) -> None:
    state = {k: v.contiguous() for k, v in sorted(model.state_dict().items())}
    state.pop("lm_head.weight", None)  # tied: the Hub files store no head
    save_safetensors(state, out_dir / "model.safetensors")
    write_json(out_dir / "config.json", model_config(dtype))


def make_qwen3_vl_checkpoint(
    out_dir: Path, layout: str = "hf", *, seed: int = 0, dtype: str = "float32"
) -> Path:
    """Write a random tiny Qwen3-VL checkpoint in `layout`; return `out_dir`."""
    check_layout(layout, LAYOUTS)
    out_dir = Path(out_dir)
    if layout in MLX_LAYOUTS:
        return via_hf_checkpoint(
            lambda tmp: make_qwen3_vl_checkpoint(tmp, "hf-legacy", seed=seed, dtype=dtype),
            out_dir,
            mlx_convert_layout(layout),
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    model = build_torch_model(seed, dtype)
    if layout == "hf":
        model.save_pretrained(str(out_dir), save_original_format=False)
    else:
        _save_legacy(model, out_dir, dtype)
    _sidecars(out_dir, legacy=layout == "hf-legacy")
    return out_dir
