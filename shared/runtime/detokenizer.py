"""Incremental detokenisation that never emits half a UTF-8 character."""

from __future__ import annotations

from typing import Any


class StreamingDetokenizer:
    """Decodes the tokens since the last clean boundary and emits only completed text.

    Byte-level BPE tokens decode to their own bytes, so decoding a segment alone equals
    decoding it in context; a trailing U+FFFD means a multi-byte character is unfinished.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._pending: list[int] = []

    def add(self, token: int) -> str:
        self._pending.append(token)
        text = self.tokenizer.decode(self._pending, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        self._pending.clear()
        return text

    def flush(self) -> str:
        text = self.tokenizer.decode(self._pending, skip_special_tokens=True)
        self._pending.clear()
        return text
