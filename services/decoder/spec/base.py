"""What a drafter hands the runner each speculative step, and what the runner calls on it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import mlx.core as mx
import numpy as np


@dataclass
class Proposal:
    drafts: mx.array  # (rows, K) int32; columns past a row's count are padding
    counts: np.ndarray  # (rows,) drafts each row really proposes (0: the row does not draft)
    q: mx.array | None = None  # (rows, K, V): the distributions sampled drafts came from
    sampled: np.ndarray | None = None  # (rows,) bool: rows whose drafts were drawn from q


class Row(Protocol):
    """The host view of a decoding row a drafter reads (a `Sequence`)."""

    history: list[int]  # prompt + every token emitted so far
    slot: int


class Drafter(Protocol):
    kind: str
    k: int  # drafts per step (--num-draft-tokens)
    aux_layers: tuple[int, ...]  # target layers whose inputs it reads (EAGLE-3); () otherwise

    def start(self, slot: int, prompt_ids: list[int]) -> None:
        """A row's prompt is prefilled into `slot`; its first token is not emitted yet."""

    def release(self, slot: int) -> None: ...

    def propose(
        self,
        rows: list[Row | None],
        caps: np.ndarray,
        index: np.ndarray,
        seeds: np.ndarray,
        temps: np.ndarray,
    ) -> Proposal:
        """Drafts for rows [0, len(rows)) (None: not drafting), at most caps[i] each."""

    def accepted(self, accepted: np.ndarray) -> None:
        """How many drafts each row of the last proposal kept (to roll its own state back)."""


def drafter_on(drafter: Drafter | None) -> bool:
    return drafter is not None and drafter.k > 0
