"""Grammar-constrained decoding with llguidance: JSON schema, any JSON object, or a lark grammar.

A `GrammarConstraint` is one request's `TokenConstraint` (services/decoder/constraints.py): the
engine asks it for the allowed-token mask before sampling and tells it the sampled token. The
matcher never raises on bad input; it enters an error state, which we surface as a request error
at build time (a schema llguidance refuses is a 400) and as "finished" at decode time (better to
stop than to emit text the grammar no longer vouches for).
"""

from __future__ import annotations

import json
import threading
from typing import Any

import llguidance
import llguidance.hf
import numpy as np
import structlog

from shared.errors import InvalidRequestError

log = structlog.get_logger("decoder")

# JSON is generated compactly with the separators json.dumps and chat templates use: flexible
# whitespace lets a weak (or random) model loop on whitespace forever inside a valid document.
JSON_OPTIONS: dict[str, Any] = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}

_lock = threading.Lock()
# (id(hf tokenizer), n_vocab, eos ids) -> (the tokenizer, kept alive so its id stays unique;
# its LLTokenizer). Building one walks the whole vocabulary (~1 s for 150k tokens): once per model.
_TOKENIZERS: dict[tuple[int, int, tuple[int, ...]], tuple[Any, llguidance.LLTokenizer]] = {}


def llg_tokenizer(
    hf_tokenizer: Any, vocab_size: int, eos_token_ids: frozenset[int] | set[int]
) -> llguidance.LLTokenizer:
    """The llguidance view of a Hugging Face fast tokenizer, cached per (tokenizer, vocab, eos).

    `vocab_size` is the model's logits width (often padded past the tokenizer's own size); the
    masks cover it all. Every EOS id ends a grammar, since the engine stops on any of them."""
    n_vocab = max(int(vocab_size), len(hf_tokenizer))
    eos = tuple(sorted(eos_token_ids)) or (hf_tokenizer.eos_token_id,)
    key = (id(hf_tokenizer), n_vocab, eos)
    with _lock:
        hit = _TOKENIZERS.get(key)
        if hit is None:
            try:
                llt = llguidance.hf.from_tokenizer(
                    hf_tokenizer, n_vocab=n_vocab, eos_token=list(eos)
                )
            except ValueError as exc:  # slow (Python) tokenizers are not supported
                raise InvalidRequestError(
                    f"structured outputs are not available for this model's tokenizer: {exc}"
                ) from exc
            hit = _TOKENIZERS[key] = (hf_tokenizer, llt)
    return hit[1]


def json_schema_grammar(schema: dict[str, Any] | str, *, strict: bool = True) -> str:
    """A grammar for documents valid against `schema`.

    strict: keywords llguidance cannot enforce are refused (a 400) rather than ignored, so a
    strict answer always validates. Non-strict requests get the lenient compiler (unsupported
    keywords are dropped), which matches what OpenAI promises for strict=false: best effort."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise InvalidRequestError(
                f"the JSON schema is not valid JSON: {exc}", param="response_format"
            ) from exc
        except RecursionError:  # deeper than Python's parser goes: far past llguidance's limit
            raise InvalidRequestError(
                "the JSON schema is nested too deeply", param="response_format"
            ) from None
    if not isinstance(schema, dict | bool):
        raise InvalidRequestError("the JSON schema must be an object", param="response_format")
    overrides = {**JSON_OPTIONS, "lenient": not strict}
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=overrides)
    except ValueError as exc:
        raise InvalidRequestError(
            f"the JSON schema is not supported: {exc}", param="response_format"
        ) from exc


def json_object_grammar() -> str:
    """Any JSON object (response_format json_object)."""
    return json_schema_grammar({"type": "object"}, strict=True)


def lark_grammar(lark: str) -> str:
    return llguidance.LLMatcher.grammar_from_lark(lark)


def bool_mask(bitmask: bytes, n: int) -> np.ndarray:
    """llguidance's little-endian bit mask -> a bool array of length n."""
    bits = np.unpackbits(np.frombuffer(bitmask, dtype=np.uint8), bitorder="little")
    return bits[:n].astype(bool)


class GrammarConstraint:
    """A TokenConstraint backed by an llguidance matcher."""

    def __init__(
        self, tokenizer: llguidance.LLTokenizer, grammar: str, *, param: str = "response_format"
    ) -> None:
        # Validate first: the constructor itself never raises on a bad grammar.
        error = llguidance.LLMatcher.validate_grammar(grammar, tokenizer)
        if error and not error.startswith("WARNING"):
            raise InvalidRequestError(f"the grammar engine refused it: {error}", param=param)
        self.matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if self.matcher.is_error():
            raise InvalidRequestError(
                f"the grammar engine refused it: {self.matcher.get_error()}", param=param
            )
        self.vocab_size = tokenizer.vocab_size
        self._eos = np.asarray(tokenizer.eos_tokens, dtype=np.int64)
        self._mask: np.ndarray | None = None  # the next step's, computed lazily once
        self.text_tokens: list[int] = []  # accepted, for debugging and tests
        # A grammar whose first step allows nothing but EOS admits no document at all (e.g. a
        # schema that is only a $ref cycle): refuse it rather than "answer" an empty string.
        # The mask is the first step's anyway, so this costs nothing.
        first = self.allowed()
        if first is None or np.isin(np.flatnonzero(first), self._eos).all():
            raise InvalidRequestError(
                "the grammar engine refused it: it admits no output at all "
                "(a schema that is only a $ref cycle, say)",
                param=param,
            )

    def allowed(self) -> np.ndarray | None:
        if self.matcher.is_error() or self.matcher.is_stopped():
            return None
        if self._mask is None:
            self._mask = bool_mask(self.matcher.compute_bitmask(), self.vocab_size)
        return self._mask

    def accept(self, token: int) -> None:
        self._mask = None
        if self.matcher.is_error() or self.matcher.is_stopped():
            return
        self.text_tokens.append(token)
        if not self.matcher.consume_token(token):
            # Only possible if something overrode the mask (another constraint, a forced token).
            log.warning("grammar_rejected_token", token=token, error=self.matcher.get_error())

    def finished(self) -> bool:
        """Stopped, broken, or complete with nothing left to add but an EOS token (ending here
        saves a step and also covers ignore_eos, where EOS would not end the sequence)."""
        m = self.matcher
        if m.is_error() or m.is_stopped():
            return True
        if not m.is_accepting():
            return False
        mask = self.allowed()
        if mask is None:
            return True
        allowed = np.flatnonzero(mask)
        return bool(allowed.size) and bool(np.isin(allowed, self._eos).all())
