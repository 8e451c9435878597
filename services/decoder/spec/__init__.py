"""Speculative decoding inside the batched decoder: drafters and their bookkeeping.

Drafters (`--draft-kind`): `ngram` (prompt lookup, no model), `draft` (a small LM sharing
the target's tokenizer, `--draft-model`), `eagle3` (an EAGLE-3 head fed the target's hidden
states, `--draft-model` a speculators checkpoint; detected from its config). The runner
verifies every drafting row's last token + drafts in one forward pass (`BatchRunner.speculate`)
and the sampler applies the acceptance rule (`batch_sampler.BatchSampler.verify`,
`spec.rejection`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import mlx.core as mx
import numpy as np

from services.decoder.spec.base import Drafter, Proposal
from services.decoder.spec.ngram import NgramProposer
from shared.runtime import mlx_thread

if TYPE_CHECKING:
    from services.decoder.config import EngineConfig
    from shared.runtime.loaded import LoadedModel

__all__ = ["DRAFT_KINDS", "Drafter", "Proposal", "SpecStats", "make_drafter"]

DRAFT_KINDS = ("draft", "ngram", "eagle3")
T = TypeVar("T")


@dataclass
class SpecStats:
    """Totals since start: acceptance = accepted / drafted; tokens per target step =
    emitted / steps (over the row-steps that drafted)."""

    steps: int = 0  # row-steps that drafted
    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # draft tokens accepted
    emitted: int = 0  # tokens those row-steps emitted (accepted + 1 each)

    def record(self, counts: np.ndarray, accepted: np.ndarray, live: np.ndarray) -> None:
        drafting = live & (counts > 0)
        self.steps += int(drafting.sum())
        self.drafted += int(counts[drafting].sum())
        self.accepted += int(accepted[drafting].sum())
        self.emitted += int((accepted[drafting] + 1).sum())

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_step(self) -> float:
        return self.emitted / self.steps if self.steps else 0.0


def detect_kind(kind: str, draft_model: str) -> str:
    """The drafter kind: as given, else eagle3 when the draft checkpoint says so, else
    draft for a draft model and nothing without one."""
    if kind:
        return kind
    if not draft_model:
        return ""
    from services.decoder.spec.eagle3 import is_eagle3_checkpoint

    return "eagle3" if is_eagle3_checkpoint(draft_model) else "draft"


def make_drafter(cfg: EngineConfig, model: LoadedModel) -> Drafter | None:
    kind = detect_kind(cfg.draft_kind, cfg.draft_model)
    if cfg.num_draft_tokens < 0:
        raise ValueError("--num-draft-tokens must be >= 0")
    if not kind or cfg.num_draft_tokens == 0:
        return None
    if kind not in DRAFT_KINDS:
        raise ValueError(f"--draft-kind must be one of {', '.join(DRAFT_KINDS)}, not {kind!r}")
    if kind == "ngram":
        return NgramProposer(cfg.num_draft_tokens)
    if not cfg.draft_model:
        raise ValueError(f"--draft-kind {kind} needs --draft-model")
    # Models load on the MLX thread, where the engine runs them (streams are thread-local).
    return _on_mlx_thread(_load_drafter, kind, cfg, model)


def _load_drafter(kind: str, cfg: EngineConfig, model: LoadedModel) -> Drafter:
    if kind == "eagle3":
        from services.decoder.spec.eagle3 import Eagle3Proposer

        return Eagle3Proposer.load(cfg.draft_model, model, cfg.num_draft_tokens, cfg.max_num_seqs)
    from services.decoder.spec.draft import DraftModelProposer
    from shared.runtime.loaded import load_model

    draft = load_model(cfg.draft_model, components=["language"])
    assert draft.language is not None
    mx.eval(draft.language.parameters())
    return DraftModelProposer(
        draft.language, cfg.num_draft_tokens, cfg.max_num_seqs, cfg.vocab_size
    )


def _on_mlx_thread(fn: Callable[..., T], *args: object) -> T:
    worker = mlx_thread.worker()
    if threading.current_thread() is worker._thread:  # noqa: SLF001 - already there
        return fn(*args)
    return worker.submit(fn, *args).result()
