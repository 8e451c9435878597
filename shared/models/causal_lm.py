"""The outer `LanguageModel` shell every decoder stack shares: a `model` (with `embed_tokens`
and `layers`), an LM head that is either its own `lm_head` or the tied embedding, one full
`KVCache` per layer, and the checkpoint clean-up that goes with them.

Subclasses build their decoder and pass it in; they keep their own `__call__` (its keyword
arguments differ per family) and turn the decoder's output into logits with `logits`.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .cache import KVCache


class CausalLM(nn.Module):
    """`args` needs hidden_size, vocab_size, model_type, tie_word_embeddings, head_dim and
    num_key_value_heads; `model` needs `embed_tokens` and `layers`."""

    # Checkpoint keys containing this are rope buffers (recomputed from the config).
    rope_buffer_key = "rotary_emb.inv_freq"

    def __init__(self, args: Any, model: nn.Module) -> None:
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = model
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def logits(self, h: mx.array) -> mx.array:
        """Normalised hidden states -> logits, through the tied embedding when there is no head."""
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    def make_cache(self) -> list[KVCache]:
        return [KVCache() for _ in self.layers]

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Drop rope buffers some checkpoints carry, and the duplicate head of tied models."""
        out = {k: v for k, v in weights.items() if self.rope_buffer_key not in k}
        if self.args.tie_word_embeddings:
            out = {k: v for k, v in out.items() if not k.startswith("lm_head.")}
        return out

    @property
    def layers(self) -> list[Any]:
        return self.model.layers

    @property
    def head_dim(self) -> int:
        return self.args.head_dim

    @property
    def n_kv_heads(self) -> int:
        return self.args.num_key_value_heads
