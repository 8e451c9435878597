"""The loader's quantized layers fold leading dimensions into rows (one kernel on MLX CUDA,
which otherwise runs a batched quantized matmul per batch element) with the numbers of MLX's
own layers."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from shared.api import load
from shared.loading.config import Quantization
from shared.models import quantized
from shared.testing.fixtures import make_checkpoint


def test_row_folding_layers_match_mlx():
    mx.random.seed(0)
    lin = nn.Linear(128, 96, bias=True)
    emb = nn.Embedding(50, 128)
    ours = quantized.QuantizedLinear.from_linear(lin, 64, 4)
    theirs = nn.QuantizedLinear.from_linear(lin, 64, 4)
    our_emb = quantized.QuantizedEmbedding.from_embedding(emb, 64, 4)
    their_emb = nn.QuantizedEmbedding.from_embedding(emb, 64, 4)
    for shape in [(5, 128), (7, 1, 128), (2, 3, 128)]:
        x = mx.random.normal(shape)
        np.testing.assert_allclose(np.array(ours(x)), np.array(theirs(x)), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(
            np.array(our_emb.as_linear(x)), np.array(their_emb.as_linear(x)), rtol=1e-5, atol=1e-5
        )
        assert ours(x).shape == (*shape[:-1], 96)


def test_quantize_swaps_only_the_picked_leaves():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 32))
    quantized.quantize(model, Quantization(64, 4), lambda path, _m: path == "layers.0")
    assert type(model.layers[0]) is quantized.QuantizedLinear
    assert type(model.layers[1]) is nn.Linear


def test_a_4bit_checkpoint_loads_row_folding_layers(tmp_path):
    path = make_checkpoint("qwen2", tmp_path / "q4", "mlx-4bit")
    lm = load(path, components=["language"]).language
    proj = lm.layers[0].mlp.gate_proj
    assert isinstance(proj, quantized.QuantizedLinear)
    # Batched decode rows give what each row gives alone.
    x = mx.random.normal((4, 1, proj.weight.shape[1] * 32 // 4))
    alone = mx.concatenate([proj(x[i : i + 1]) for i in range(4)])
    np.testing.assert_allclose(np.array(proj(x)), np.array(alone), rtol=1e-5, atol=1e-5)
