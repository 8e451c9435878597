"""Qwen3 dense text models (transformers `Qwen3ForCausalLM`).

Qwen3 drops the q/k/v bias of Qwen2 (bias only if `attention_bias`), adds a per-head RMSNorm on
queries and keys before rope, and gives `head_dim` explicitly (not hidden_size / heads).
"""

from __future__ import annotations

from dataclasses import dataclass

from . import transformer


@dataclass
class ModelArgs(transformer.TransformerArgs):
    model_type: str = "qwen3"
    qk_norm: bool = True


class Model(transformer.Model):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__(args)
