"""A token id's text and raw bytes, as OpenAI's logprobs report them (`token`, `bytes`).

Byte-level BPE vocabularies (Qwen, Llama 3) spell each token with GPT-2's byte-to-unicode
alphabet, so a token's exact bytes are recoverable even when it holds part of a UTF-8
character; other tokenizers fall back to the decoded text's UTF-8.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's `bytes_to_unicode`."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += range(ord("®"), ord("ÿ") + 1)
    chars, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars, strict=True)}


class TokenText:
    def __init__(self, tokenizer: Any, cache_size: int = 65536) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, bytes]] = {}
        self._size = cache_size

    def __call__(self, token_id: int) -> tuple[str, bytes]:
        if (hit := self._cache.get(token_id)) is not None:
            return hit
        raw = self._raw(token_id)
        text = raw.decode("utf-8", errors="replace")
        if len(self._cache) < self._size:
            self._cache[token_id] = (text, raw)
        return text, raw

    def _raw(self, token_id: int) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if piece is None:
            return b""
        decoder = _byte_decoder()
        if all(ch in decoder for ch in piece):
            return bytes(decoder[ch] for ch in piece)
        return self.tokenizer.decode([token_id]).encode("utf-8")
