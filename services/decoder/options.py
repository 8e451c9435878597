"""Per-request logits adjustments (OpenAI / vLLM semantics), applied before sampling."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LogitsOptions:
    """Adjustments applied to the logits before sampling (OpenAI / vLLM semantics)."""

    logit_bias: dict[int, float] = field(default_factory=dict)
    repetition_penalty: float = 1.0  # >1 discourages tokens seen in the prompt or output
    presence_penalty: float = 0.0  # subtracted once from tokens already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence in the output
    min_tokens: int = 0  # the ids in `banned_until_min` cannot be sampled before this many
    banned_until_min: frozenset[int] = frozenset()

    @property
    def penalised(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )
