"""Qwen2 / Qwen2.5 text models (transformers `Qwen2ForCausalLM`).

Qwen2 has a bias on q, k and v but not on o. Sliding-window settings are ignored: every
released Qwen2 checkpoint ships with `use_sliding_window: false`.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import transformer


@dataclass
class ModelArgs(transformer.TransformerArgs):
    model_type: str = "qwen2"

    def __post_init__(self) -> None:
        if self.qkv_bias is None:
            self.qkv_bias = True
        if self.o_bias is None:
            self.o_bias = False
        super().__post_init__()


class Model(transformer.Model):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__(args)
