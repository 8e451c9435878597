"""Random EAGLE-3 heads in the published layouts, for tests and benchmarks (no download)."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np


def make_eagle3(
    out: Path, target_cfg: dict, layout: str, seed: int = 0, draft_vocab: int = 200, k: int = 3
) -> Path:
    """A random EAGLE-3 head: `speculators` (layer config nested, `layers.0.*`, fc bias, own
    embedding) or `eagle` (yuhuili: Llama config at the root, `midlayer.*`, no fc bias, the
    target's embedding)."""
    rng = np.random.default_rng(seed)
    text = target_cfg.get("text_config") or target_cfg
    hidden, vocab = text["hidden_size"], text["vocab_size"]
    draft_vocab = min(draft_vocab, vocab)
    heads = max(4, hidden // 128)
    kv = max(2, heads // 4)
    dim, inter = hidden // heads, 3 * hidden // 2
    layer = dict(
        model_type="llama", hidden_size=hidden, num_attention_heads=heads,
        num_key_value_heads=kv, intermediate_size=inter, vocab_size=vocab, rms_norm_eps=1e-6,
        rope_theta=10000.0, max_position_embeddings=4096, num_hidden_layers=1,
    )  # fmt: skip

    def w(*shape: int) -> mx.array:
        scale = 0.5 / np.sqrt(shape[-1])  # keeps activations O(1) at any width
        return mx.array(rng.normal(0, scale, shape).astype(np.float32))

    prefix = "layers.0." if layout == "speculators" else "midlayer."
    weights = {
        "fc.weight": w(hidden, 3 * hidden),
        f"{prefix}self_attn.q_proj.weight": w(heads * dim, 2 * hidden),
        f"{prefix}self_attn.k_proj.weight": w(kv * dim, 2 * hidden),
        f"{prefix}self_attn.v_proj.weight": w(kv * dim, 2 * hidden),
        f"{prefix}self_attn.o_proj.weight": w(hidden, heads * dim),
        f"{prefix}mlp.gate_proj.weight": w(inter, hidden),
        f"{prefix}mlp.up_proj.weight": w(inter, hidden),
        f"{prefix}mlp.down_proj.weight": w(hidden, inter),
        "norm.weight": mx.ones((hidden,)),
        "lm_head.weight": w(draft_vocab, hidden),
    }
    for norm in ("input_layernorm", "hidden_norm", "post_attention_layernorm"):
        weights[f"{prefix}{norm}.weight"] = mx.array(1 + rng.normal(0, 0.1, hidden), mx.float32)
    # The draft vocabulary: a sorted subset of target ids, stored as offsets (d2t) and a mask.
    ids = np.sort(rng.choice(vocab, draft_vocab, replace=False))
    weights["d2t"] = mx.array(ids - np.arange(draft_vocab), mx.int64)
    t2d = np.zeros(vocab, bool)
    t2d[ids] = True
    weights["t2d"] = mx.array(t2d)
    aux = [0, text["num_hidden_layers"] // 2, text["num_hidden_layers"]]
    if layout == "speculators":
        weights["fc.bias"] = w(hidden)
        weights["embed_tokens.weight"] = w(vocab, hidden)
        config = dict(
            architectures=["Eagle3Speculator"], speculators_model_type="eagle3",
            transformer_layer_config=layer, draft_vocab_size=draft_vocab,
            norm_before_residual=True, target_hidden_size=hidden,
            eagle_aux_hidden_state_layer_ids=aux,
            speculators_config=dict(
                algorithm="eagle3", default_proposal_method="greedy",
                proposal_methods=[dict(proposal_type="greedy", speculative_tokens=k)],
                verifier=dict(name_or_path="tiny-qwen3", architectures=["Qwen3ForCausalLM"]),
            ),
        )  # fmt: skip
    else:
        config = dict(
            architectures=["LlamaForCausalLMEagle3"], draft_vocab_size=draft_vocab,
            eagle_config=dict(eagle_aux_hidden_state_layer_ids=aux), **layer,
        )  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config))
    mx.save_safetensors(str(out / "model.safetensors"), weights)
    return out
