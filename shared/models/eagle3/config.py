"""EAGLE-3 checkpoint configs, read from either published layout.

- speculators (`RedHatAI/...-speculator.eagle3`): `speculators_model_type: "eagle3"`, the
  decoder layer's fields in `transformer_layer_config`, plus `draft_vocab_size`,
  `norm_before_residual`, `target_hidden_size` and `speculators_config` (the verifier).
- EAGLE (`yuhuili/EAGLE3-...`): a Llama config at the root with `draft_vocab_size`
  (architecture `LlamaForCausalLMEagle3`).

Which target layers feed the head: `eagle_aux_hidden_state_layer_ids` (root, `eagle_config`
or the layer config) when given, else vLLM's default (2, L // 2, L - 3) for an L-layer target.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..transformer import TransformerArgs


def is_eagle3_config(config: dict[str, Any]) -> bool:
    archs = " ".join(config.get("architectures") or []).lower()
    return (
        config.get("speculators_model_type") == "eagle3"
        or "eagle3" in archs
        or "eagle_aux_hidden_state_layer_ids" in config
    )


@dataclass
class Eagle3Args:
    layer: TransformerArgs  # the one decoder layer (its q/k/v take 2 x hidden inputs)
    draft_vocab_size: int
    target_hidden_size: int
    norm_before_residual: bool = False
    aux_layer_ids: tuple[int, ...] | None = None  # None: the default for the target's depth

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Eagle3Args:
        fields = dict(config.get("transformer_layer_config") or config)
        fields.setdefault("num_hidden_layers", 1)
        fields["num_hidden_layers"] = 1
        fields["tie_word_embeddings"] = False
        layer = TransformerArgs.from_dict(fields)
        vocab = config.get("draft_vocab_size") or layer.vocab_size
        aux = _aux_ids(config) or _aux_ids(fields)
        return cls(
            layer=layer,
            draft_vocab_size=int(vocab),
            target_hidden_size=int(config.get("target_hidden_size") or layer.hidden_size),
            norm_before_residual=bool(config.get("norm_before_residual", False)),
            aux_layer_ids=aux,
        )

    def aux_layers(self, target_layers: int) -> tuple[int, ...]:
        if self.aux_layer_ids is not None:
            return self.aux_layer_ids
        return (2, target_layers // 2, target_layers - 3)


def _aux_ids(config: dict[str, Any]) -> tuple[int, ...] | None:
    ids = config.get("eagle_aux_hidden_state_layer_ids")
    if ids is None:
        ids = (config.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    return tuple(int(i) for i in ids) if ids else None
