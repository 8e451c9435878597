"""Bytes each service holds for a real architecture, from shapes alone (nothing is allocated).

    .venv/bin/python bench/param_bytes.py

MLX initialises parameters lazily, so building the modules and summing `nbytes` costs nothing.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from shared.models.registry import family_for

QWEN25_VL_7B = {
    "model_type": "qwen2_5_vl",
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "rope_theta": 1000000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_config": {
        "depth": 32,
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "out_hidden_size": 3584,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "window_size": 112,
    },
}


def nbytes(module: nn.Module, dtype: mx.Dtype) -> int:
    return sum(v.size * dtype.size for _, v in tree_flatten(module.parameters()))


def quantized_nbytes(module: nn.Module, bits: int, group_size: int) -> int:
    """Packed weights plus a bf16 scale and bias per group, for every Linear/Embedding."""
    total = 0
    for _, m in module.named_modules():
        if isinstance(m, nn.Linear | nn.Embedding):
            n = m.weight.size
            total += n * bits // 8 + (n // group_size) * 2 * 2
            if isinstance(m, nn.Linear) and "bias" in m:
                total += m.bias.size * 2
        elif not m.children() and m.parameters():
            total += sum(v.size * 2 for _, v in tree_flatten(m.parameters()))
    return total


def main() -> None:
    family = family_for(QWEN25_VL_7B)
    vision = family.vision(QWEN25_VL_7B)
    language = family.language(QWEN25_VL_7B)
    gib = 1024**3
    print("Qwen2.5-VL-7B architecture")
    rows = {
        "encoder (vision tower + merger), bf16": nbytes(vision, mx.bfloat16),
        "decoder (language model), bf16": nbytes(language, mx.bfloat16),
        "decoder (language model), 4-bit g64": quantized_nbytes(language, 4, 64),
    }
    for name, size in rows.items():
        print(f"  {name:<40} {size / gib:.2f} GiB")


if __name__ == "__main__":
    main()
