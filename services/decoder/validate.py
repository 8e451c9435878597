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
    drafting = bool(cfg.draft_kind or cfg.draft_model) and cfg.num_draft_tokens > 0
    if request.num_draft_tokens < 0 or (  # without a drafter the option has no effect
        drafting and request.num_draft_tokens > cfg.num_draft_tokens
    ):
        raise InvalidRequestError(
            f"speculative.num_draft_tokens must be in [0, {cfg.num_draft_tokens}] on this "
            "server (--num-draft-tokens)",
            param="num_draft_tokens",
        )
    # Unset: up to the context, within what the KV budget can hold at all. A slot with a KV
    # window (--max-kv-size) never holds more than the window, however long the request.
    window = cfg.kv_quant.max_kv_size
    max_tokens = request.max_tokens or (room if window else min(room, cfg.kv_tokens - len(ids)))
    held = len(ids) + max_tokens
    if max_tokens <= 0 or (min(held, window) if window else held) > cfg.kv_tokens:
        raise InvalidRequestError(
            f"the prompt ({len(ids)} tokens) and max_tokens ({request.max_tokens or 'unset'}) "
            f"do not fit this decoder's KV cache of {cfg.kv_tokens} tokens",
            param="max_tokens",
        )
    return max_tokens
