"""Gemma 3 arguments from config.json shapes as published (most text fields left to
transformers' defaults) agree with what transformers makes of the same dicts."""

from __future__ import annotations

import copy

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding  # noqa: E402

from shared.loading.config import text_config  # noqa: E402
from shared.models.gemma3.config import FULL, SLIDING, TextArgs  # noqa: E402
from shared.models.gemma3.family import build_vision  # noqa: E402

# The shape of google/gemma-3-4b-it's config.json (transformers-4 style, sparse text_config).
GEMMA3_4B = {
    "architectures": ["Gemma3ForConditionalGeneration"],
    "boi_token_index": 255999,
    "eoi_token_index": 256000,
    "eos_token_id": [1, 106],
    "image_token_index": 262144,
    "initializer_range": 0.02,
    "mm_tokens_per_image": 256,
    "model_type": "gemma3",
    "text_config": {
        "hidden_size": 2560,
        "intermediate_size": 10240,
        "model_type": "gemma3_text",
        "num_hidden_layers": 34,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
        "sliding_window": 1024,
    },
    "torch_dtype": "bfloat16",
    "vision_config": {
        "hidden_size": 1152,
        "image_size": 896,
        "intermediate_size": 4304,
        "model_type": "siglip_vision_model",
        "num_attention_heads": 16,
        "num_hidden_layers": 27,
        "patch_size": 14,
        "vision_use_head": False,
    },
}


def transformers_text_config(cfg: dict):
    cfg = copy.deepcopy(cfg)
    cfg.pop("architectures"), cfg.pop("torch_dtype")
    return transformers.Gemma3Config(**cfg).text_config


@pytest.mark.parametrize("style", ["transformers-4", "transformers-5"])
def test_published_config_matches_transformers(style: str) -> None:
    ref = transformers_text_config(GEMMA3_4B)
    cfg = GEMMA3_4B if style == "transformers-4" else {**GEMMA3_4B, "text_config": ref.to_dict()}
    args = TextArgs.from_dict(text_config(cfg))
    names = ["head_dim", "num_attention_heads", "num_key_value_heads", "vocab_size"]
    names += ["query_pre_attn_scalar", "sliding_window", "layer_types", "rms_norm_eps"]
    for name in names:
        assert getattr(args, name) == getattr(ref, name), name
    assert args.layer_types.count(FULL) == 5  # every 6th of 34
    rotary = Gemma3RotaryEmbedding(ref)
    positions = torch.arange(0, 4096, 97)[None]
    for layer_type in (SLIDING, FULL):
        with torch.no_grad():
            cos, _ = rotary(torch.zeros(1, dtype=torch.float32), positions, layer_type)
        rope = args.make_rope(layer_type)
        ours = rope.positions(positions.shape[1], 0, mx.array(positions.numpy()))
        np.testing.assert_allclose(np.array(ours.cos[0, 0]), cos[0].numpy(), atol=1e-5)


def test_projector_pools_the_published_grid_to_256_tokens() -> None:
    tower = build_vision(GEMMA3_4B)
    projector = tower.multi_modal_projector
    assert (projector.side, projector.kernel) == (64, 4)  # 896 / 14 patches, pooled by 4
    assert projector.mm_input_projection_weight.shape == (1152, 2560)
