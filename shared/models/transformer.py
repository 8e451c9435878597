"""Decoder-only transformer layers shared by Llama, Qwen2, Qwen3 and the Qwen2-VL language model.

The module tree mirrors transformers / mlx-lm (`model.embed_tokens`, `model.layers.{i}.self_attn.
{q,k,v,o}_proj`, `.self_attn.q_norm|k_norm`, `.mlp.{gate,up,down}_proj`, `.input_layernorm`,
`.post_attention_layernorm`, `model.norm`, `lm_head`) so checkpoints load with `load_weights`.
Family differences are flags on `TransformerArgs`: q/k/v bias, o bias, per-head q/k RMSNorm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import mlx.core as mx
import mlx.nn as nn

from .base import BaseModelArgs, Cache
from .causal_lm import CausalLM
from .kv_quant.protocol import AttendingCache
from .rope import RoPE, RotaryPositions, initialize_rope


@dataclass
class TransformerArgs(BaseModelArgs):
    """Text config fields (a flat dict; VLM callers flatten `text_config` first)."""

    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    vocab_size: int
    model_type: str = ""
    rms_norm_eps: float = 1e-6
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int | None = None
    rope_theta: float | None = None
    rope_scaling: dict[str, Any] | None = None
    rope_parameters: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    attention_bias: bool | None = None  # config key: bias on q, k, v and o (Llama, Qwen3)
    mlp_bias: bool = False
    # Family switches; subclasses set their defaults in __post_init__.
    qkv_bias: bool | None = None
    o_bias: bool | None = None
    qk_norm: bool = False

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.qkv_bias is None:
            self.qkv_bias = bool(self.attention_bias)
        if self.o_bias is None:
            self.o_bias = bool(self.attention_bias)
        if self.tie_word_embeddings is None:
            self.tie_word_embeddings = False
        if self.hidden_act != "silu":
            raise NotImplementedError(f"hidden_act {self.hidden_act!r} (only silu/SwiGLU)")

    def make_rope(self) -> RoPE:
        return initialize_rope(
            self.head_dim, self.rope_theta, self.rope_scaling, self.rope_parameters
        )


def attention_mask(length: int) -> str | None:
    """Causal mask for L > 1. MLX's "causal" is lower-right aligned (the last query sees every
    key), which is what a chunk appended after `offset` cached tokens needs; one token needs
    none."""
    return "causal" if length > 1 else None


def create_attention_mask(length: int, cache: Cache | None) -> str | mx.array | None:
    """The mask for this forward pass: a cache that pads rows (the batch cache) knows which
    positions each row may see; otherwise the plain causal rule (mlx-lm's convention)."""
    make_mask = getattr(cache, "make_mask", None)
    if make_mask is not None:
        return make_mask(length)
    return attention_mask(length)


def cached_attention(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    scale: float,
    mask: str | mx.array | None,
    cache: Any,
    first_key: int = 0,
) -> mx.array:
    """(B, H, L, D) attention of `q` over `cache` with this call's `k`/`v` appended.

    An `AttendingCache` (quantized / windowed) reads its own storage. Otherwise the cache hands
    back every key so far, and keys before `first_key` (outside every query's window: Gemma 3's
    sliding layers) are dropped before the attention.
    """
    if isinstance(cache, AttendingCache):
        return cache.attend(q, k, v, scale, mask)
    if cache is not None:
        k, v = cache.update_and_fetch(k, v)
    if first_key:
        k, v = k[..., first_key:, :], v[..., first_key:, :]
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


class Attention(nn.Module):
    def __init__(self, args: TransformerArgs) -> None:
        super().__init__()
        dim, head_dim = args.hidden_size, args.head_dim
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.q_proj = nn.Linear(dim, self.n_heads * head_dim, bias=args.qkv_bias)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * head_dim, bias=args.qkv_bias)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * head_dim, bias=args.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * head_dim, dim, bias=args.o_bias)
        if args.qk_norm:  # Qwen3: RMSNorm over each head's features, before rope
            self.q_norm = nn.RMSNorm(head_dim, eps=args.rms_norm_eps)
            self.k_norm = nn.RMSNorm(head_dim, eps=args.rms_norm_eps)

    def __call__(
        self,
        x: mx.array,
        rope: RoPE,
        positions: RotaryPositions,
        mask: str | mx.array | None = None,
        cache: Cache | None = None,
    ) -> mx.array:
        b, length, _ = x.shape
        q = self.q_proj(x).reshape(b, length, self.n_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, length, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, length, self.n_kv_heads, self.head_dim)
        if "q_norm" in self:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
        q, k = rope.apply(q, positions), rope.apply(k, positions)
        out = cached_attention(q, k, v, self.scale, mask, cache)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(b, length, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, args: TransformerArgs) -> None:
        super().__init__()
        dim, hidden, bias = args.hidden_size, args.intermediate_size, args.mlp_bias
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, args: TransformerArgs) -> None:
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(
        self,
        x: mx.array,
        rope: RoPE,
        positions: RotaryPositions,
        mask: str | mx.array | None = None,
        cache: Cache | None = None,
    ) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), rope, positions, mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class TransformerModel(nn.Module):
    """The decoder stack: embeddings, layers, final norm. Returns normalised hidden states."""

    # Subclasses swap in a layer that takes extra per-call state (Qwen3-VL's DeepStack).
    layer_class: ClassVar[type[DecoderLayer]] = DecoderLayer

    def __init__(self, args: TransformerArgs, rope: RoPE | None = None) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [self.layer_class(args) for _ in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        # One rope for all layers (it has no parameters): positions are computed once per call.
        self.rope = rope if rope is not None else args.make_rope()
        # EAGLE-3 drafting reads the residual stream entering these layers (an id equal to
        # the layer count: the stack's output before the final norm). Underscored names keep
        # them out of the parameters; `_captured` holds the last call's, lazily.
        self._capture: tuple[int, ...] = ()
        self._captured: list[mx.array] = []

    def capture(self, layer_ids: tuple[int, ...]) -> None:
        """Keep the hidden states entering `layer_ids` on every call (see `captured`)."""
        self._capture = tuple(layer_ids)

    @property
    def captured(self) -> list[mx.array]:
        """The last call's (B, L, hidden) states entering each captured layer, in order."""
        return self._captured

    def __call__(
        self,
        inputs: mx.array | None,
        cache: list[Cache] | None = None,
        input_embeddings: mx.array | None = None,
        position_ids: mx.array | None = None,
    ) -> mx.array:
        h = input_embeddings if input_embeddings is not None else self.embed_tokens(inputs)
        if cache is None:
            cache = [None] * len(self.layers)
        offset = cache[0].offset if cache[0] is not None else 0
        length = h.shape[1]
        positions = self.rope.positions(length, offset, position_ids)
        mask = create_attention_mask(length, cache[0])
        seen: dict[int, mx.array] = {}
        for i, (layer, layer_cache) in enumerate(zip(self.layers, cache, strict=True)):
            if i in self._capture:
                seen[i] = h
            h = layer(h, self.rope, positions, mask, layer_cache)
        if self._capture:
            seen[len(self.layers)] = h
            self._captured = [seen[i] for i in self._capture]
        return self.norm(h)


class Model(CausalLM):
    """Decoder + LM head; implements the `LanguageModel` protocol.

    `model` replaces the plain `TransformerModel` (a subclass adding per-family inputs)."""

    def __init__(
        self, args: TransformerArgs, rope: RoPE | None = None, model: TransformerModel | None = None
    ) -> None:
        super().__init__(args, model if model is not None else TransformerModel(args, rope))

    def __call__(
        self,
        inputs: mx.array | None,
        cache: list[Cache] | None = None,
        *,
        input_embeddings: mx.array | None = None,
        position_ids: mx.array | None = None,
    ) -> mx.array:
        return self.logits(self.model(inputs, cache, input_embeddings, position_ids))

    def embed(self, input_ids: mx.array) -> mx.array:
        return self.model.embed_tokens(input_ids)
