"""EAGLE-3 drafting in the batch: a one-layer head fed the target's own hidden states.

The target's `TransformerModel` is told to keep the residual stream entering three layers
(`capture`); every prefill chunk and every verification step hands those states to this
drafter, fused by the head's `fc`. The head's cache holds `lengths[slot]` positions; position
i pairs the target's features at i with the token at i + 1, so features wait in `pending[slot]`
until the token after them is known. Each step feeds what is pending (normally the accepted
positions of the last verification; the whole prompt after prefill) in one wide step, then
drafts k - 1 more positions feeding the head's own output as features, and after verification
rolls back to the positions the target computed (their features replace the head's guesses).

Prompt positions served from the prefix cache were never computed, so the head has no
features for them: their KV in the head's cache is left as it is (acceptance may drop on such
hits; output never changes, the target verifies every token).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np

from services.decoder.spec.base import Proposal, Row
from services.decoder.spec.draft import pick
from services.decoder.spec.slots import SlotDrafter
from shared.models.eagle3 import Eagle3Model, is_eagle3_config, load_eagle3
from shared.models.transformer import TransformerModel
from shared.runtime.loaded import LoadedModel


def is_eagle3_checkpoint(path: str) -> bool:
    config = Path(path) / "config.json"
    return config.is_file() and is_eagle3_config(json.loads(config.read_text()))


class Eagle3Proposer(SlotDrafter):
    """`lengths[slot]`: positions in the head's (one-layer) cache."""

    kind = "eagle3"

    def __init__(self, head: Eagle3Model, target: object, k: int, max_slots: int) -> None:
        super().__init__(k, max_slots, 1)
        self.head = head
        self.vocab = int(target.args.vocab_size)  # type: ignore[attr-defined]
        self.embed = head.embed_tokens if "embed_tokens" in head else target.embed  # type: ignore[attr-defined]
        self.aux_layers = head.args.aux_layers(len(target.layers))  # type: ignore[attr-defined]
        self.pending: dict[int, mx.array] = {}  # slot -> (n, hidden) fused features waiting
        self.prefilling: dict[int, list[mx.array]] = {}

    @classmethod
    def load(cls, path: str, model: LoadedModel, k: int, max_slots: int) -> Eagle3Proposer:
        lm = model.language
        if not isinstance(getattr(lm, "model", None), TransformerModel):  # it has `capture`
            raise ValueError("EAGLE-3 needs a target whose layer inputs can be captured")
        head = load_eagle3(path)
        hidden = int(lm.args.hidden_size)  # type: ignore[attr-defined]
        if head.args.target_hidden_size != hidden:
            raise ValueError(
                f"the EAGLE-3 head expects a target hidden size of "
                f"{head.args.target_hidden_size}; this model's is {hidden}"
            )
        drafter = cls(head, lm, k, max_slots)
        if max(drafter.aux_layers) > len(lm.layers):  # type: ignore[attr-defined]
            raise ValueError(f"EAGLE-3 layer ids {drafter.aux_layers} exceed the target's depth")
        return drafter

    def prefill_chunk(self, slot: int, aux: list[mx.array]) -> None:
        """A prefill chunk's (1, L, H) captured states (in prompt order)."""
        self.prefilling.setdefault(slot, []).append(self.head.fuse(mx.concatenate(aux, -1))[0])

    def start(self, slot: int, prompt_ids: list[int]) -> None:
        chunks = self.prefilling.pop(slot, [])
        features = mx.concatenate(chunks, axis=0) if chunks else None
        computed = 0 if features is None else features.shape[0]
        self.lengths[slot] = len(prompt_ids) - computed  # a prefix-cache hit was not computed
        self.layout.reserve(slot, len(prompt_ids), self.max_slots)
        self.occupied[slot] = True
        if features is not None:
            self.pending[slot] = features

    def release(self, slot: int) -> None:
        self.pending.pop(slot, None)
        self.prefilling.pop(slot, None)
        super().release(slot)

    def propose(
        self, rows: list[Row | None], caps: np.ndarray, index: np.ndarray, seeds: np.ndarray,
        temps: np.ndarray,
    ) -> Proposal:  # fmt: skip
        n = len(rows)
        before = self.lengths[:n].copy()
        fed = np.array([self._ready(row, i, before) for i, row in enumerate(rows)], np.int64)
        drafting = (caps > 0) & (fed > 0)
        fed = np.where(drafting, fed, 0)
        logits, hidden = self._feed(rows, fed, before)
        self.lengths[:n] += fed
        temps = np.where(drafting, temps, 0.0)
        drafts, qs = [], []
        for j in range(self.k):
            if j:
                pos = self._next_positions(n)
                embeds = self.embed(drafts[-1][:, None])
                out, h = self.head(embeds, hidden[:, None], self.caches, position_ids=pos)
                logits, hidden = out[:, 0], h[:, 0]
                self.lengths[:n] += drafting
            token, q = pick(logits, temps, seeds, index + 1 + j, self.vocab, self.head.d2t)
            drafts.append(token)
            qs.append(q)
        self._last = (before, fed, drafting)
        return self._proposal(drafts, qs, caps, drafting, temps > 0)

    def accepted(self, accepted: np.ndarray) -> None:
        """Roll back to the fed positions: the verification's features replace the rest."""
        assert self._last is not None
        before, fed, _ = self._last
        self._roll_back(before + fed)

    def observe(self, aux: list[mx.array], accepted: np.ndarray, live: np.ndarray) -> None:
        """A verification's captured states: positions [0, accepted + 1) of each live row
        were computed on real tokens; they wait for the token after them."""
        fused = self.head.fuse(mx.concatenate(aux, axis=-1))  # (rows, W, hidden)
        for row in np.flatnonzero(live):
            if row < len(self.occupied) and self.occupied[row]:
                new = fused[int(row), : int(accepted[row]) + 1]
                old = self.pending.get(int(row))
                self.pending[int(row)] = new if old is None else mx.concatenate([old, new])

    def _ready(self, row: Row | None, slot: int, before: np.ndarray) -> int:
        """Pending positions of a row whose features line up with its tokens (else 0)."""
        pending = self.pending.get(slot)
        if row is None or pending is None or not self.occupied[slot]:
            return 0
        count = pending.shape[0]
        return count if len(row.history) == before[slot] + count + 1 else 0

    def _feed(
        self, rows: list[Row | None], fed: np.ndarray, before: np.ndarray
    ) -> tuple[mx.array, mx.array]:
        """Feed each drafting row's pending features with the tokens after them; return the
        logits and pre-norm output at each row's last fed position."""
        n, width = len(rows), max(int(fed.max()), 1)
        dim = self.head.args.layer.hidden_size
        tokens = np.zeros((n, width), np.int32)
        feats = []
        for i, row in enumerate(rows):
            f = int(fed[i])
            if f and row is not None:
                start = int(before[i]) + 1
                tokens[i, :f] = row.history[start : start + f]
                feats.append(mx.pad(self.pending.pop(i), [(0, width - f), (0, 0)]))
            else:
                feats.append(mx.zeros((width, dim), self.head.fc.weight.dtype))
        pos = self._wide_positions(before, width)
        out, h = self.head(self.embed(mx.array(tokens)), mx.stack(feats), self.caches, pos)
        last = mx.array(np.maximum(fed - 1, 0))
        return out[mx.arange(n), last], h[mx.arange(n), last]
