"""Prompt lookup: propose the tokens that followed the latest earlier occurrence of the
sequence's last n tokens (prompt and output), trying the longest n first.

What vLLM's `ngram` speculator and mlx-lm's prompt lookup do; no model, so it costs nothing
when it finds no match, and it is what makes extraction, OCR and editing prompts fast.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from services.decoder.spec.base import Proposal, Row


def lookup(history: list[int], k: int, max_n: int = 4, min_n: int = 1) -> list[int]:
    """Up to `k` tokens continuing the longest suffix n-gram (max_n..min_n) of `history`
    found earlier in it (the most recent occurrence); [] when none matches."""
    if k <= 0 or len(history) < min_n + 1:
        return []
    seq = np.asarray(history, np.int64)
    total = len(seq)
    for n in range(min(max_n, total - 1), min_n - 1, -1):
        suffix = seq[total - n :]
        # Windows starting at 0 .. total - n - 1: every occurrence that ends before the suffix.
        windows = np.lib.stride_tricks.sliding_window_view(seq[: total - 1], n)
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if len(hits):
            start = int(hits[-1]) + n
            return seq[start : start + k].tolist()
    return []


class NgramProposer:
    """Host-side drafts for the rows of a step (no device state to keep in sync)."""

    kind = "ngram"
    aux_layers: tuple[int, ...] = ()

    def __init__(self, num_draft_tokens: int, max_n: int = 4, min_n: int = 1) -> None:
        self.k, self.max_n, self.min_n = num_draft_tokens, max_n, min_n

    def propose_row(self, history: list[int], cap: int) -> list[int]:
        return lookup(history, min(self.k, cap), self.max_n, self.min_n)

    def start(self, slot: int, prompt_ids: list[int]) -> None:
        pass

    def release(self, slot: int) -> None:
        pass

    def propose(
        self,
        rows: list[Row | None],
        caps: np.ndarray,
        index: np.ndarray,
        seeds: np.ndarray,
        temps: np.ndarray,
    ) -> Proposal:
        found = [
            self.propose_row(row.history, int(cap)) if row is not None and cap > 0 else []
            for row, cap in zip(rows, caps, strict=True)
        ]
        width = max(1, max(len(d) for d in found))
        drafts = np.zeros((len(rows), width), np.int32)
        for i, d in enumerate(found):
            drafts[i, : len(d)] = d
        counts = np.array([len(d) for d in found], np.int64)
        return Proposal(mx.array(drafts), counts)

    def accepted(self, accepted: np.ndarray) -> None:
        pass
