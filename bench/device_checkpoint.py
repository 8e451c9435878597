"""A random Qwen2.5-VL-7B-architecture checkpoint for speed work, in the mlx-community layout
with the language model quantized (4-bit, group 64, affine) as mlx-community ships it.

    python bench/device_checkpoint.py OUT_DIR [--bits 4] [--group-size 64]

MLX only (runs on the lent H100 with MLX CUDA). Dimensions are Qwen2.5-VL-7B's (see
../shared/device-mlx-cuda.md); the tokenizer is the tiny test one, so the embedding and lm_head
rows past its vocabulary are zeroed: random logits there would make greedy output undecodable.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from shared.models.registry import family_for
from shared.testing import mlx_convert
from shared.testing.fixtures import _write_sidecars, generation_config, legacy_config
from shared.testing.tokenizer import vocab_size

FAMILY = "qwen2_5_vl"
TEXT_7B = {
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "max_position_embeddings": 128000,
    "max_window_layers": 28,
    "vocab_size": 152064,
    "rope_theta": 1000000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "tie_word_embeddings": False,
}
VISION_7B = {
    "depth": 32,
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "out_hidden_size": 3584,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "window_size": 112,
    "tokens_per_second": 2,
}


def config_7b(bits: int, group_size: int) -> dict:
    config = legacy_config(FAMILY, "bfloat16")  # special-token ids of the test tokenizer
    config.update(TEXT_7B)
    config["vision_config"] = {**config["vision_config"], **VISION_7B}
    config = mlx_convert._mlx_config(config, generation_config(FAMILY), vlm=True)
    quant = {"group_size": group_size, "bits": bits, "mode": "affine"}
    config["quantization"] = config["quantization_config"] = quant
    return config


def randomize(module: nn.Module, seed: int) -> None:
    """bf16 weights with the fixtures' scales, drawn parameter by parameter (bounded memory)."""
    params = tree_flatten(module.parameters())
    keys = mx.random.split(mx.random.key(seed), len(params))
    new = []
    for key, (name, value) in zip(keys, params, strict=True):
        noise = mx.random.normal(value.shape, dtype=mx.bfloat16, key=key)
        if value.ndim >= 2:
            fan_in = value.size // value.shape[0]
            new.append((name, noise * (1.5 / fan_in**0.5)))
        elif name.endswith("bias"):
            new.append((name, noise * 0.1))
        else:
            new.append((name, 1.0 + noise * 0.1))
        mx.eval(new[-1][1])
    module.load_weights(new)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("out", type=Path)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    args = p.parse_args()
    config = config_7b(args.bits, args.group_size)
    family = family_for(config)
    vision, language = family.vision(config), family.language(config)
    randomize(vision, 0)
    randomize(language, 1)
    n_tok = vocab_size("qwen")
    for table in (language.model.embed_tokens, language.lm_head):
        table.weight[n_tok:] = 0
    # Quantize every layer whose input width divides the group size (all of them here).
    nn.quantize(language, group_size=args.group_size, bits=args.bits)
    weights = {f"vision_tower.{k}": v for k, v in tree_flatten(vision.parameters())}
    weights |= {f"language_model.{k}": v for k, v in tree_flatten(language.parameters())}
    mlx_convert._save(args.out, weights)
    (args.out / "config.json").write_text(json.dumps(config, indent=4) + "\n")
    _write_sidecars(FAMILY, args.out, legacy=True, size="small")  # preprocessor keeps 448x448
    print(args.out)


if __name__ == "__main__":
    main()
