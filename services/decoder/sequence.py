"""One request's generation state on the engine thread: prefill, then one token per step.

Kept apart from the engine's scheduling so continuous batching (#4) can step many of these
together. The arithmetic is `shared.runtime.generate`'s (same prefill chunks, same decode
positions, same sampler), so greedy output is token-identical to the in-process path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx

from shared.media.types import ProcessedPrompt
from shared.runtime.generate import PREFILL_STEP, prepare_inputs
from shared.runtime.loaded import LoadedModel
from shared.runtime.sampling import Sampler, SamplingParams


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


class Sequence:
    def __init__(
        self,
        model: LoadedModel,
        prompt: ProcessedPrompt,
        features: list[mx.array],
        sampling: SamplingParams,
        options: LogitsOptions,
    ) -> None:
        if model.language is None:
            raise ValueError("this model was loaded without its language model")
        self.model, self.lm = model, model.language
        self.prompt, self.features, self.options = prompt, features, options
        self.sampler = Sampler(sampling)
        self.cache: list = []
        self.delta = 0
        self.generated = 0  # tokens handed out by next_token
        self._next: mx.array | None = None
        self._bias: mx.array | None = None
        self._counts: mx.array | None = None  # per-vocab occurrences in the output (penalties)
        self._seen_prompt: mx.array | None = None

    @property
    def kv_tokens(self) -> int:
        return self.cache[0].offset if self.cache else 0

    def prefill(self, cancelled: Callable[[], bool]) -> bool:
        """Run the prompt in chunks (checking `cancelled` between them); False if cancelled."""
        inputs = prepare_inputs(self.model, self.prompt, self.features)
        self.features = []  # merged into the embeddings; let the arrays go
        self.cache, self.delta = self.lm.make_cache(), inputs.rope_delta
        ids, emb, pos = inputs.input_ids, inputs.input_embeddings, inputs.position_ids
        start, n = 0, ids.shape[1]
        while True:
            end = n if n - start <= PREFILL_STEP else start + PREFILL_STEP
            logits = self.lm(
                ids[:, start:end],
                self.cache,
                input_embeddings=None if emb is None else emb[:, start:end],
                position_ids=None if pos is None else pos[..., start:end],
            )
            if end == n:
                break
            mx.eval([c.state for c in self.cache])
            start = end
            if cancelled():
                return False
        self._setup_logits(logits.shape[-1], ids)
        self._next = self._sample(logits[:, -1, :], 0)
        mx.async_eval(self._next)
        return True

    def next_token(self, more: bool) -> int:
        """The next token; with `more`, queue the following step before reading this one back
        (the host-device round trip overlaps the next forward pass)."""
        y = self._next
        assert y is not None, "prefill first"
        if more:
            positions = None
            if self.delta:
                positions = mx.full((1, 1), self.cache[0].offset + self.delta, dtype=mx.int32)
            if self._counts is not None:
                self._counts = self._counts + (mx.arange(self._counts.shape[0]) == y[0])
            logits = self.lm(y[:, None], self.cache, position_ids=positions)[:, -1, :]
            self._next = self._sample(logits, self.generated + 1)
            mx.async_eval(self._next)
        self.generated += 1
        return int(y.item())

    def _setup_logits(self, vocab: int, prompt_ids: mx.array) -> None:
        opts = self.options
        bias = {t: b for t, b in opts.logit_bias.items() if 0 <= t < vocab}
        if bias:
            dense = mx.zeros((vocab,), dtype=mx.float32)
            dense[mx.array(list(bias))] = mx.array(list(bias.values()), dtype=mx.float32)
            self._bias = dense
        if opts.penalised:
            self._counts = mx.zeros((vocab,), dtype=mx.float32)
            seen = mx.zeros((vocab,), dtype=mx.bool_)
            seen[prompt_ids[0]] = True
            self._seen_prompt = seen

    def _sample(self, logits: mx.array, index: int) -> mx.array:
        """Adjust (1, V) logits for the output token at `index`, then sample it."""
        opts = self.options
        if self._bias is not None:
            logits = logits + self._bias.astype(logits.dtype)
        if self._counts is not None and self._seen_prompt is not None:
            counts = self._counts.astype(logits.dtype)
            if opts.repetition_penalty != 1.0:
                seen = self._seen_prompt | (counts > 0)
                rp = opts.repetition_penalty
                logits = mx.where(seen, mx.where(logits > 0, logits / rp, logits * rp), logits)
            logits = logits - opts.frequency_penalty * counts
            logits = logits - opts.presence_penalty * (counts > 0).astype(logits.dtype)
        if index < opts.min_tokens and opts.banned_until_min:
            banned = [t for t in opts.banned_until_min if 0 <= t < logits.shape[-1]]
            logits[:, mx.array(banned)] = -float("inf")
        return self.sampler(logits)
