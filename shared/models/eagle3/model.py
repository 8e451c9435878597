"""The EAGLE-3 head: one decoder layer over [embedding ; fused target features].

Per position i the head reads the target's hidden states entering three layers at i, fused by
`fc` (3 x target hidden -> hidden), and the embedding of token i + 1; its output at i predicts
token i + 2. Drafting further, it feeds its own pre-norm output in place of the fused features
(vLLM's `llama_eagle3.py`, speculators' `Eagle3Speculator`). Logits are over a draft vocabulary
mapped to target ids by `d2t` (target = draft + d2t[draft]).

Weight names (`sanitize` maps both layouts): `fc.weight` (+ `fc.bias` in speculators),
`layers.0.*` or `midlayer.*` (q/k/v take 2 x hidden inputs; `hidden_norm` normalises the
features), `norm.weight`, `lm_head.weight`, `d2t`, `t2d` (unused), optional `embed_tokens`
(else the target's embedding is used, as vLLM does).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..base import Cache
from ..cache import KVCache
from ..transformer import MLP, Attention, TransformerArgs, create_attention_mask
from .config import Eagle3Args


class Eagle3Layer(nn.Module):
    def __init__(self, args: TransformerArgs, norm_before_residual: bool) -> None:
        super().__init__()
        self.self_attn = Attention(args)
        width, bias = 2 * args.hidden_size, args.qkv_bias
        heads, kv, dim = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        self.self_attn.q_proj = nn.Linear(width, heads * dim, bias=bias)
        self.self_attn.k_proj = nn.Linear(width, kv * dim, bias=bias)
        self.self_attn.v_proj = nn.Linear(width, kv * dim, bias=bias)
        self.mlp = MLP(args)
        eps = args.rms_norm_eps
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=eps)
        self.hidden_norm = nn.RMSNorm(args.hidden_size, eps=eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=eps)
        self.norm_before_residual = norm_before_residual

    def __call__(
        self, embeds: mx.array, hidden: mx.array, rope, positions, mask, cache: Cache | None
    ) -> mx.array:
        if self.norm_before_residual:
            hidden = self.hidden_norm(hidden)
            residual = hidden
        else:
            residual, hidden = hidden, self.hidden_norm(hidden)
        x = mx.concatenate([self.input_layernorm(embeds), hidden], axis=-1)
        h = residual + self.self_attn(x, rope, positions, mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Eagle3Model(nn.Module):
    def __init__(self, args: Eagle3Args, *, own_embedding: bool, fc_bias: bool) -> None:
        super().__init__()
        self.args = args
        layer = args.layer
        if own_embedding:
            self.embed_tokens = nn.Embedding(layer.vocab_size, layer.hidden_size)
        self.fc = nn.Linear(3 * args.target_hidden_size, layer.hidden_size, bias=fc_bias)
        self.layers = [Eagle3Layer(layer, args.norm_before_residual)]
        self.norm = nn.RMSNorm(layer.hidden_size, eps=layer.rms_norm_eps)
        self.lm_head = nn.Linear(layer.hidden_size, args.draft_vocab_size, bias=False)
        self.d2t = mx.zeros((args.draft_vocab_size,), mx.int32)
        self.rope = layer.make_rope()

    def fuse(self, features: mx.array) -> mx.array:
        """(..., 3 x target hidden) concatenated target states -> (..., hidden)."""
        return self.fc(features)

    def __call__(
        self,
        embeds: mx.array,
        hidden: mx.array,
        cache: list[Cache],
        position_ids: mx.array | None = None,
    ) -> tuple[mx.array, mx.array]:
        """(draft-vocabulary logits, pre-norm output) for (B, L) positions."""
        length = embeds.shape[1]
        positions = self.rope.positions(length, cache[0].offset, position_ids)
        mask = create_attention_mask(length, cache[0])
        h = self.layers[0](embeds, hidden, self.rope, positions, mask, cache[0])
        return self.lm_head(self.norm(h)), h

    def to_target(self, draft_ids: mx.array) -> mx.array:
        return draft_ids + self.d2t[draft_ids]

    def make_cache(self) -> list[Cache]:
        return [KVCache()]

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        out = {}
        for key, value in weights.items():
            if key == "t2d" or key.startswith("verifier") or "rotary_emb" in key:
                continue
            key = key.removeprefix("model.").replace("midlayer.", "layers.0.")
            out[key] = value.astype(mx.int32) if key == "d2t" else value
        return out
