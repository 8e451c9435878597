"""Request checks done in `submit`, before anything is queued (so errors are clean 4xx)."""

from __future__ import annotations

from services.decoder.config import EngineConfig
from services.decoder.types import EngineRequest
from shared.errors import InvalidRequestError


def validate(request: EngineRequest, cfg: EngineConfig) -> int:
    """Raise InvalidRequestError for a bad request; return its effective max_tokens."""
    ids = request.prompt.input_ids
    if not ids:
        raise InvalidRequestError("the prompt is empty")
    if min(ids) < 0 or max(ids) >= cfg.vocab_size:
        raise InvalidRequestError(f"prompt token ids must be in [0, {cfg.vocab_size})")
    room = cfg.max_model_len - len(ids)
    if room <= 0:
        raise InvalidRequestError(
            f"the prompt has {len(ids)} tokens; this model's context is {cfg.max_model_len}"
        )
    if request.max_tokens > room:
        raise InvalidRequestError(
            f"prompt ({len(ids)} tokens) + max_tokens ({request.max_tokens}) exceeds the "
            f"model's context of {cfg.max_model_len} tokens",
            param="max_tokens",
        )
    try:
        request.sampling.validate()
    except ValueError as exc:
        raise InvalidRequestError(str(exc)) from exc
    if request.top_logprobs < 0 or request.top_logprobs > cfg.top_logprobs_k:
        raise InvalidRequestError(
            f"top_logprobs must be in [0, {cfg.top_logprobs_k}] on this server (--top-logprobs-k)",
            param="top_logprobs",
        )
    # Unset: up to the context, within what the KV budget can hold at all.
    max_tokens = request.max_tokens or min(room, cfg.kv_tokens - len(ids))
    if max_tokens <= 0 or len(ids) + max_tokens > cfg.kv_tokens:
        raise InvalidRequestError(
            f"the prompt ({len(ids)} tokens) and max_tokens ({request.max_tokens or 'unset'}) "
            f"do not fit this decoder's KV cache of {cfg.kv_tokens} tokens",
            param="max_tokens",
        )
    return max_tokens
