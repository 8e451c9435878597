"""The JSON configs of a fixture checkpoint: config.json (Hub / transformers-4 style),
generation_config.json and the (VLM) image / video pre-processor configs."""

from __future__ import annotations

from typing import Any

from .families import ARCHITECTURES, TIED, VLM_FAMILIES, _check_family, token_ids
from .sizes import Size, _size
from .tokenizer import vocab_size

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


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
