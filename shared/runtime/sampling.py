"""Token sampling from logits: greedy, temperature, top-k, top-p and min-p, seeded per request."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import mlx.core as mx


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None

    def validate(self) -> None:
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not 0 <= self.min_p < 1:
            raise ValueError("min_p must be in [0, 1)")


def filter_logprobs(logprobs: mx.array, params: SamplingParams) -> mx.array:
    """Mask (to -inf) tokens excluded by top-k, top-p and min-p; logprobs is (B, V)."""
    neg_inf = mx.array(-float("inf"), logprobs.dtype)
    if params.top_k > 0 and params.top_k < logprobs.shape[-1]:
        kth = mx.sort(logprobs, axis=-1)[:, -params.top_k][:, None]
        logprobs = mx.where(logprobs < kth, neg_inf, logprobs)
    if params.min_p > 0:
        top = mx.max(logprobs, axis=-1, keepdims=True)
        logprobs = mx.where(logprobs < top + mx.log(mx.array(params.min_p)), neg_inf, logprobs)
    if params.top_p < 1.0:
        order = mx.argsort(-logprobs, axis=-1)
        sorted_lp = mx.take_along_axis(logprobs, order, axis=-1)
        probs = mx.exp(sorted_lp)
        # Keep a token while the mass before it is below top_p, so the top token always stays.
        mass_before = mx.cumsum(probs, axis=-1) - probs
        sorted_lp = mx.where(mass_before < params.top_p, sorted_lp, neg_inf)
        inverse = mx.argsort(order, axis=-1)
        logprobs = mx.take_along_axis(sorted_lp, inverse, axis=-1)
    return logprobs


class Sampler:
    """Stateful per request: owns its PRNG key so a seed gives the same tokens anywhere."""

    def __init__(self, params: SamplingParams) -> None:
        params.validate()
        self.params = params
        seed = params.seed if params.seed is not None else secrets.randbits(32)
        self._key = mx.random.key(seed)

    def __call__(self, logits: mx.array) -> mx.array:
        """logits (B, V) -> token ids (B,)."""
        if self.params.temperature == 0:
            return mx.argmax(logits, axis=-1)
        logprobs = logits.astype(mx.float32) / self.params.temperature
        logprobs = logprobs - mx.logsumexp(logprobs, axis=-1, keepdims=True)
        logprobs = filter_logprobs(logprobs, self.params)
        self._key, sub = mx.random.split(self._key)
        return mx.random.categorical(logprobs, key=sub)
