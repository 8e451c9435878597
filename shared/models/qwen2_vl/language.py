"""Qwen2-VL / Qwen2.5-VL language model: the Qwen2 decoder with multimodal rotary positions.

`position_ids` may be:
* None: positions continue from the cache offset (text-only prompts; plain 1-D rope, fast path);
* (3, B, L): temporal/height/width positions from `rope_index` (prefill with media);
* (B, L): one row used for all three axes, as transformers does for 2-D ids. Decode steps
  after media (`cache offset + rope_delta`) should pass this form: with L == 1 it takes the
  `mx.fast.rope` path with a per-row offset. (3, B, L) with equal rows gives the same numbers
  through the slower general path.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.models import transformer
from shared.models.rope import MRoPE, initialize_mrope


@dataclass
class TextArgs(transformer.TransformerArgs):
    """The flat text config (`text_config` merged over the root by the loader)."""

    model_type: str = "qwen2_vl"
    rms_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.qkv_bias is None:
            self.qkv_bias = True  # Qwen2: bias on q, k, v; none on o
        if self.o_bias is None:
            self.o_bias = False
        super().__post_init__()
        # transformers' Qwen2-VL attention always uses hidden_size / heads, whatever head_dim says.
        self.head_dim = self.hidden_size // self.num_attention_heads

    def make_rope(self) -> MRoPE:
        return initialize_mrope(
            self.head_dim, self.rope_theta, self.rope_scaling, self.rope_parameters
        )

    @property
    def mrope_section(self) -> tuple[int, ...]:
        return self.make_rope().mrope_section


class LanguageModel(transformer.Model):
    """Implements the `LanguageModel` protocol; weights as `model.*` and `lm_head`."""

    def __init__(self, args: TextArgs) -> None:
        super().__init__(args, args.make_rope())
