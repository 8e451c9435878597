"""The Gemma 3 language model (transformers `Gemma3TextModel` / `Gemma3ForCausalLM`) in MLX.

What differs from the Llama-style stack in `shared/models/transformer.py`: Gemma RMSNorm
(1 + weight) and four norms per layer (before and after attention and MLP), per-head q/k
norms, scores scaled by `query_pre_attn_scalar ** -0.5`, embeddings multiplied by
sqrt(hidden) in the embedding dtype, GELU-tanh MLP, and interleaved sliding-window / global
layers with their own rope (`rope_local_base_freq` for sliding layers, theta and scaling for
global ones). Masks, image bidirectionality included, are built in `masks.py`.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from shared.models.causal_lm import CausalLM
from shared.models.gemma3.config import FULL, SLIDING, TextArgs
from shared.models.gemma3.masks import Mask, layer_masks
from shared.models.gemma3.norm import GemmaRMSNorm
from shared.models.rope import RoPE, RotaryPositions
from shared.models.transformer import cached_attention


def softcap(x: mx.array, cap: float) -> mx.array:
    return mx.tanh(x / cap) * cap


class Attention(nn.Module):
    def __init__(self, args: TextArgs) -> None:
        super().__init__()
        dim, hd, bias = args.hidden_size, args.head_dim, args.attention_bias
        self.n_heads, self.n_kv_heads, self.head_dim = (
            args.num_attention_heads,
            args.num_key_value_heads,
            hd,
        )
        self.scale = float(args.query_pre_attn_scalar) ** -0.5
        self.q_proj = nn.Linear(dim, self.n_heads * hd, bias=bias)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * hd, dim, bias=bias)
        self.q_norm = GemmaRMSNorm(hd, eps=args.rms_norm_eps)
        self.k_norm = GemmaRMSNorm(hd, eps=args.rms_norm_eps)

    def __call__(
        self,
        x: mx.array,
        rope: RoPE,
        positions: RotaryPositions,
        view: tuple[Mask, int],
        cache: Any,
    ) -> mx.array:
        """`view` is (mask, first_key): keys before first_key are outside every window."""
        mask, first_key = view
        b, length, _ = x.shape
        q = self.q_norm(self.q_proj(x).reshape(b, length, self.n_heads, -1))
        k = self.k_norm(self.k_proj(x).reshape(b, length, self.n_kv_heads, -1))
        v = self.v_proj(x).reshape(b, length, self.n_kv_heads, -1)
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
        q, k = rope.apply(q, positions), rope.apply(k, positions)
        # A quantized cache attends over all it stores (`layer_masks` gives it first_key 0).
        out = cached_attention(q, k, v, self.scale, mask, cache, first_key)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(b, length, -1))


class MLP(nn.Module):
    def __init__(self, args: TextArgs) -> None:
        super().__init__()
        dim, hidden = args.hidden_size, args.intermediate_size
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.gelu_approx(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, args: TextArgs, layer_type: str) -> None:
        super().__init__()
        self.layer_type = layer_type
        dim, eps = args.hidden_size, args.rms_norm_eps
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = GemmaRMSNorm(dim, eps)
        self.post_attention_layernorm = GemmaRMSNorm(dim, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(dim, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(dim, eps)

    def __call__(
        self,
        x: mx.array,
        rope: RoPE,
        positions: RotaryPositions,
        view: tuple[Mask, int],
        cache: Any,
    ) -> mx.array:
        h = self.self_attn(self.input_layernorm(x), rope, positions, view, cache)
        x = x + self.post_attention_layernorm(h)
        h = self.mlp(self.pre_feedforward_layernorm(x))
        return x + self.post_feedforward_layernorm(h)


class GemmaModel(nn.Module):
    """`model.*`: scaled embeddings, the layers, the final norm."""

    def __init__(self, args: TextArgs) -> None:
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        assert args.layer_types is not None
        self.layers = [DecoderLayer(args, t) for t in args.layer_types]
        self.norm = GemmaRMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        # No parameters: rotary tables are computed from the config.
        self.rope_local = args.make_rope(SLIDING)
        self.rope_global = args.make_rope(FULL)

    def embed(self, input_ids: mx.array) -> mx.array:
        # Image placeholders may lie beyond the vocabulary (transformers swaps them for 0).
        ids = mx.where(input_ids < self.args.vocab_size, input_ids, 0)
        h = self.embed_tokens(ids)
        # sqrt(hidden) rounded to the embedding dtype first, as transformers does.
        return h * mx.array(self.args.hidden_size**0.5, dtype=h.dtype)

    def __call__(
        self,
        inputs: mx.array | None,
        cache: list[Any] | None,
        input_embeddings: mx.array | None,
        position_ids: mx.array | None,
        image_blocks: mx.array | None,
    ) -> mx.array:
        h = input_embeddings if input_embeddings is not None else self.embed(inputs)
        cache = cache if cache is not None else [None] * len(self.layers)
        offset = cache[0].offset if cache[0] is not None else 0
        length = h.shape[1]
        ropes = {SLIDING: self.rope_local, FULL: self.rope_global}
        positions = {t: r.positions(length, offset, position_ids) for t, r in ropes.items()}
        masks = layer_masks(cache[0], length, self.args.sliding_window, image_blocks)
        for layer, layer_cache in zip(self.layers, cache, strict=True):
            t = layer.layer_type
            h = layer(h, ropes[t], positions[t], masks[t], layer_cache)
        return self.norm(h)


class LanguageModel(CausalLM):
    """Implements the `LanguageModel` protocol; weights as `model.*` (+ `lm_head` if untied).

    `image_blocks` (1, L): each prompt token's image index (-1: text), from the embedder's
    `PrefillInputs.extras`; it makes image tokens attend to their whole image.
    """

    # Sliding layers keep full KV and mask the window: prefix-cache blocks stay exact (APC).
    # `make_cache` (one full KVCache per layer, sliding layers too) is what makes that hold, and
    # the batch cache then needs no special case.
    keeps_full_kv = True
    # Any rope buffer: Gemma 3 checkpoints may carry `rotary_emb_local.*` as well.
    rope_buffer_key = "rotary_emb"

    def __init__(self, args: TextArgs) -> None:
        super().__init__(args, GemmaModel(args))

    def __call__(
        self,
        inputs: mx.array | None,
        cache: list[Any] | None = None,
        *,
        input_embeddings: mx.array | None = None,
        position_ids: mx.array | None = None,
        image_blocks: mx.array | None = None,
    ) -> mx.array:
        h = self.model(inputs, cache, input_embeddings, position_ids, image_blocks)
        logits = self.logits(h)
        cap = self.args.final_logit_softcapping
        return logits if cap is None else softcap(logits, cap)

    def embed(self, input_ids: mx.array) -> mx.array:
        return self.model.embed(input_ids)
