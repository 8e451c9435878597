"""Llama / Qwen2 / Qwen3 in MLX against transformers in fp32: logits and greedy decoding.

Tiny random models (2 layers, hidden 64, 4 heads, 2 kv heads). Weights are drawn with a large
std so that logits are well separated and greedy decoding actually tests something; the top-2
margin is checked so a near-tie cannot make the token comparison meaningless.
"""

from __future__ import annotations

import importlib
from typing import Any

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from shared.models.base import LanguageModel  # noqa: E402
from shared.models.rope import initialize_rope  # noqa: E402
from tests.reference import one_torch_thread  # noqa: E402, F401  (autouse fixture)

TOL = 1e-4
N_NEW = 32
PROMPT_LEN = 16

COMMON: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
    max_position_embeddings=256,
    initializer_range=0.2,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)

LLAMA3_ROPE = dict(
    rope_type="llama3",
    rope_theta=10000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    # Small so that the tiny head_dim has low-, medium- and high-frequency bands.
    original_max_position_embeddings=64,
)

# name -> (transformers config class, causal LM class, our module, extra config fields)
FAMILIES: dict[str, tuple[str, str, str, dict[str, Any]]] = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", "shared.models.qwen2", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", "shared.models.qwen3", {"head_dim": 16}),
    "llama3": (
        "LlamaConfig",
        "LlamaForCausalLM",
        "shared.models.llama",
        {"rope_parameters": LLAMA3_ROPE},
    ),
    "llama_tied": (
        "LlamaConfig",
        "LlamaForCausalLM",
        "shared.models.llama",
        {"tie_word_embeddings": True, "rope_parameters": {"rope_type": "default"}},
    ),
}


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def build_pair(name: str, seed: int = 0):
    """A random transformers model and the same weights loaded into our MLX model."""
    cfg_cls, lm_cls, module_name, extra = FAMILIES[name]
    torch.manual_seed(seed)
    config = getattr(transformers, cfg_cls)(**COMMON, **extra)
    hf = getattr(transformers, lm_cls)(config).eval()
    module = importlib.import_module(module_name)
    model = module.Model(module.ModelArgs.from_dict(config.to_dict()))
    load_from_torch(model, hf.state_dict())
    return hf, model


def load_from_torch(model, state_dict: dict[str, Any]) -> None:
    weights = {k: mx.array(v.detach().float().numpy()) for k, v in state_dict.items()}
    model.load_weights(list(model.sanitize(weights).items()), strict=True)
    mx.eval(model.parameters())


def prompt(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, COMMON["vocab_size"], size=PROMPT_LEN)


def hf_logits(hf, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.tensor(ids)[None]).logits[0].numpy()


def mlx_greedy(model, ids: np.ndarray, n: int) -> list[int]:
    cache = model.make_cache()
    logits = model(mx.array(ids)[None], cache)
    out = []
    for _ in range(n):
        tok = int(mx.argmax(logits[0, -1]).item())
        out.append(tok)
        logits = model(mx.array([[tok]]), cache)
    return out


@pytest.mark.parametrize("name", list(FAMILIES))
def test_logits_match_transformers(name: str) -> None:
    hf, model = build_pair(name)
    assert isinstance(model, LanguageModel)
    ids = prompt()
    ours = np.array(model(mx.array(ids)[None])[0])
    err = rel_err(ours, hf_logits(hf, ids))
    print(f"{name}: logits rel err {err:.2e}")
    assert err <= TOL


@pytest.mark.parametrize("name", list(FAMILIES))
def test_greedy_decode_matches_generate(name: str) -> None:
    hf, model = build_pair(name)
    ids = prompt()
    with torch.no_grad():
        gen = hf.generate(
            torch.tensor(ids)[None],
            max_new_tokens=N_NEW,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
    expected = gen.sequences[0, PROMPT_LEN:].tolist()
    assert len(expected) == N_NEW
    # The comparison is only meaningful if no step is a near-tie.
    top2 = [torch.topk(s[0], 2).values for s in gen.scores]
    margin = min(float(t[0] - t[1]) for t in top2)
    assert margin > 1e-3, f"seed gives a near-tie (margin {margin})"
    assert len(set(expected)) > 1, "degenerate continuation"
    assert mlx_greedy(model, ids, N_NEW) == expected


@pytest.mark.parametrize("name", ["qwen2", "qwen3"])
def test_perturbed_weight_is_detected(name: str) -> None:
    hf, model = build_pair(name)
    ids = prompt()
    reference = hf_logits(hf, ids)
    o_proj = model.layers[1].self_attn.o_proj
    o_proj.weight = o_proj.weight + 1e-2
    err = rel_err(np.array(model(mx.array(ids)[None])[0]), reference)
    assert err > TOL


@pytest.mark.parametrize("name", ["qwen3", "llama3"])
def test_chunked_prefill_matches_full(name: str) -> None:
    hf, model = build_pair(name)
    ids = prompt()
    full = np.array(model(mx.array(ids)[None])[0])
    cache = model.make_cache()
    first = np.array(model(mx.array(ids[:7])[None], cache)[0])
    second = np.array(model(mx.array(ids[7:])[None], cache)[0])
    assert cache[0].offset == PROMPT_LEN
    chunked = np.concatenate([first, second])
    assert rel_err(chunked, full) <= TOL
    assert rel_err(chunked, hf_logits(hf, ids)) <= TOL


def test_explicit_positions_match_offsets() -> None:
    _, model = build_pair("llama3")
    ids = mx.array(prompt())[None]
    full = model(ids)
    positions = mx.arange(PROMPT_LEN)[None]
    assert rel_err(np.array(model(ids, position_ids=positions)), np.array(full)) <= TOL
    # Decode with an explicit (B, 1) position takes the per-row-offset path.
    cache = model.make_cache()
    model(ids[:, :-1], cache)
    last = model(ids[:, -1:], cache, position_ids=mx.array([[PROMPT_LEN - 1]]))
    assert rel_err(np.array(last[0, -1]), np.array(full[0, -1])) <= TOL


def test_input_embeddings_equal_ids() -> None:
    _, model = build_pair("qwen2")
    ids = mx.array(prompt())[None]
    by_ids = np.array(model(ids))
    by_embeds = np.array(model(None, input_embeddings=model.embed(ids)))
    assert rel_err(by_embeds, by_ids) == 0.0


def test_transformers4_and_5_config_styles_agree() -> None:
    from shared.models import llama, qwen2

    v5 = {
        "hidden_size": 64,
        "num_hidden_layers": 1,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "vocab_size": 32,
        "rope_theta": None,
        "rope_parameters": dict(LLAMA3_ROPE, rope_theta=500000.0),
    }
    scaling = {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}
    v4 = dict(v5, rope_theta=500000.0, rope_scaling=scaling, rope_parameters=None)
    a, b = llama.ModelArgs.from_dict(v5), llama.ModelArgs.from_dict(v4)
    fa, fb = a.make_rope().inv_freq, b.make_rope().inv_freq
    assert mx.array_equal(fa, fb)
    assert not mx.allclose(fa, initialize_rope(16, 500000.0).inv_freq)
    q2 = qwen2.ModelArgs.from_dict({**v5, "rope_parameters": None, "attention_bias": None})
    assert (q2.qkv_bias, q2.o_bias, q2.head_dim, q2.num_key_value_heads) == (True, False, 16, 4)
