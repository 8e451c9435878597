"""The per-request hook that restricts the next token (structured outputs, forced end of
thinking, tool-call grammars). Implementations live elsewhere; the engine only calls these.

The engine calls, on its own thread and in this order for every generated token:
`allowed()` (before sampling it), then `accept(token)` once it is known, then `finished()`.
A request may carry several constraints: their masks are ANDed, and any `finished()` ends it.
Rows with constraints make the host read token n before sampling n+1, but the forward pass of
step n+1 is queued first (it needs only token n on the device), so the overlap remains.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class TokenConstraint(Protocol):
    """Per-request restriction of the next token (grammar, forced end-of-thinking).
    Engine thread only."""

    def allowed(self) -> np.ndarray | None:
        """Bool mask of length >= vocab (True = allowed), or None = no restriction."""
        ...

    def accept(self, token: int) -> None: ...

    def finished(self) -> bool:
        """True: end the sequence (reason "stop")."""
        ...


def combined_mask(constraints: list[TokenConstraint], vocab: int) -> np.ndarray | None:
    """The AND of every constraint's mask, cut to `vocab` entries; None when none restricts."""
    mask: np.ndarray | None = None
    for constraint in constraints:
        allowed = constraint.allowed()
        if allowed is None:
            continue
        allowed = np.asarray(allowed, dtype=bool)[:vocab]
        if allowed.shape[0] < vocab:
            raise ValueError(f"a constraint mask has {allowed.shape[0]} entries; vocab is {vocab}")
        mask = allowed.copy() if mask is None else mask & allowed
    return mask
