"""Llama 2/3.x text models (transformers `LlamaForCausalLM`), including llama3 rope scaling.

Llama takes no q/k/v/o bias unless `attention_bias` is set, and 3.2-1B/3B tie the embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import transformer


@dataclass
class ModelArgs(transformer.TransformerArgs):
    model_type: str = "llama"
    rms_norm_eps: float = 1e-6


class Model(transformer.Model):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__(args)
