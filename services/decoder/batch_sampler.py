"""One token per row of a mixed batch, each row with its own sampling parameters.

Rows are slots of the batch (see `shared.models.batch_cache`). Per-slot parameters live in
host vectors indexed by slot, so a step only gathers them (no per-row Python), and every
optional stage (penalties, logit bias, min_tokens bans, top-k/p/min-p, noise, logprobs) runs
only when some row of the call needs it: an all-greedy batch is one argmax.

Randomness is counter-based: a row's noise is a hash of (its seed, the token's index, the
vocab id), so a seed gives the same tokens whatever else is in the batch and whatever step
the row happens to be sampled in. Gumbel-max over the filtered log-probs is exact sampling.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from services.decoder.options import LogitsOptions
from shared.runtime.sampling import SamplingParams

_GOLDEN, _M1, _M2 = 0x9E3779B9, 0x85EBCA6B, 0xC2B2AE35


def _mix_np(x: np.ndarray) -> np.ndarray:
    """murmur3's 32-bit finaliser (uint32 arithmetic wraps, as intended)."""
    x = x ^ (x >> 16)
    x = x * np.uint32(_M1)
    x = x ^ (x >> 13)
    x = x * np.uint32(_M2)
    return x ^ (x >> 16)


def _mix(x: mx.array) -> mx.array:
    x = x ^ (x >> 16)
    x = x * mx.array(_M1, mx.uint32)
    x = x ^ (x >> 13)
    x = x * mx.array(_M2, mx.uint32)
    return x ^ (x >> 16)


def gumbel_noise(seeds: np.ndarray, index: np.ndarray, vocab: int) -> mx.array:
    """(rows, vocab) Gumbel noise determined by each row's (seed, token index) only."""
    with np.errstate(over="ignore"):
        key = _mix_np(
            seeds.astype(np.uint32) ^ _mix_np(index.astype(np.uint32) * np.uint32(_GOLDEN))
        )
    cols = mx.arange(vocab, dtype=mx.uint32) * mx.array(_GOLDEN, mx.uint32)
    bits = _mix(mx.array(key)[:, None] ^ cols[None, :])
    u = ((bits >> 8).astype(mx.float32) + 0.5) * (1.0 / (1 << 24))  # in (0, 1)
    return -mx.log(-mx.log(u))


# Per-slot parameters of a free slot: every optional stage off.
_DEFAULTS: dict[str, float | bool] = dict(
    temp=0.0, top_p=1.0, top_k=0, min_p=0.0, rep=1.0, presence=0.0, frequency=0.0,
    penalised=False, min_tokens=0, want=-1,
)  # fmt: skip


@dataclass
class Sampled:
    """One sampling call's results, still on the device until `read`."""

    tokens: mx.array  # (rows,) int32
    logprob: mx.array | None = None  # (rows,) raw log-softmax of the chosen token
    top_ids: mx.array | None = None  # (rows, K) unordered
    top_lps: mx.array | None = None

    def arrays(self) -> list[mx.array]:
        return [a for a in (self.tokens, self.logprob, self.top_ids, self.top_lps) if a is not None]


@dataclass
class Verified:
    """One speculative verification's results, on the device until read."""

    tokens: mx.array  # (rows, W) int32: row i emits tokens[i, : accepted[i] + 1]
    accepted: mx.array  # (rows,) drafts accepted
    first: Sampled  # position 0 as `sample` gives it (with logprobs for rows that ask)

    def arrays(self) -> list[mx.array]:
        return [self.tokens, self.accepted, *self.first.arrays()]


def _draft_counts(drafts: mx.array, vocab: int) -> mx.array:
    """(rows * W, V): occurrences of the drafts before each position (0 at position 0)."""
    rows, k = drafts.shape
    onehot = (drafts[..., None] == mx.arange(vocab)[None, None, :]).astype(mx.float32)
    before = mx.concatenate([mx.zeros((rows, 1, vocab)), mx.cumsum(onehot, axis=1)], axis=1)
    return before.reshape(rows * (k + 1), vocab)


class BatchSampler:
    def __init__(self, max_slots: int, vocab: int, top_logprobs_k: int = 0) -> None:
        self.vocab, self.top_logprobs_k = vocab, top_logprobs_k
        self.temp = np.zeros(max_slots, np.float32)
        self.top_p = np.ones(max_slots, np.float32)
        self.top_k = np.zeros(max_slots, np.int64)
        self.min_p = np.zeros(max_slots, np.float32)
        self.seed = np.zeros(max_slots, np.uint32)
        self.rep = np.ones(max_slots, np.float32)
        self.presence = np.zeros(max_slots, np.float32)
        self.frequency = np.zeros(max_slots, np.float32)
        self.penalised = np.zeros(max_slots, bool)
        self.min_tokens = np.zeros(max_slots, np.int64)
        self.want = np.full(max_slots, -1, np.int64)  # -1: no logprobs, else how many top
        self.bias: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.bans: dict[int, np.ndarray] = {}
        self._counts: mx.array | None = None  # (slots, V) output occurrences (penalties)
        self._seen: mx.array | None = None  # (slots, V) tokens of the prompt

    def add(
        self,
        slot: int,
        params: SamplingParams,
        options: LogitsOptions,
        prompt_ids: list[int],
        logprobs: int = -1,
    ) -> None:
        """Set a slot's parameters (before its first token is sampled)."""
        values = dict(
            temp=params.temperature, top_p=params.top_p, top_k=params.top_k, min_p=params.min_p,
            rep=options.repetition_penalty, presence=options.presence_penalty,
            frequency=options.frequency_penalty, penalised=options.penalised,
            min_tokens=options.min_tokens, want=logprobs,
        )  # fmt: skip
        for name, value in values.items():
            getattr(self, name)[slot] = value
        seed = params.seed if params.seed is not None else secrets.randbits(32)
        self.seed[slot] = (seed ^ (seed >> 32)) & 0xFFFFFFFF  # any int64 seed, folded
        bias = {t: b for t, b in options.logit_bias.items() if 0 <= t < self.vocab}
        if bias:
            ids, vals = np.array(list(bias), np.int32), np.array(list(bias.values()), np.float32)
            self.bias[slot] = (ids, vals)
        banned = [t for t in options.banned_until_min if 0 <= t < self.vocab]
        if options.min_tokens > 0 and banned:
            self.bans[slot] = np.array(banned, np.int32)
        if options.penalised:
            self._start_penalties(slot, prompt_ids)

    def remove(self, slot: int) -> None:
        """Back to defaults, so a free slot never makes a step run an optional stage."""
        for name, value in _DEFAULTS.items():
            getattr(self, name)[slot] = value
        self.bias.pop(slot, None)
        self.bans.pop(slot, None)
        if not self.penalised.any():
            self._counts = self._seen = None  # nobody needs the (slots, V) matrices

    def sample(
        self,
        logits: mx.array,
        slots: np.ndarray,
        index: np.ndarray,
        live: np.ndarray | None = None,
        masks: dict[int, np.ndarray] | None = None,
    ) -> Sampled:
        """Sample row i of `logits` (rows, V) with slot `slots[i]`'s parameters as that
        sequence's token number `index[i]`. Only `live` rows update the penalty counts;
        `masks` maps a row to its allowed-token mask (constraints)."""
        raw = logits.astype(mx.float32)
        x = self._process(raw, slots, index, masks)
        tokens = self._choose(x, slots, index)
        if self._counts is not None:
            alive = slots if live is None else slots[live]
            picked = tokens if live is None else tokens[mx.array(np.flatnonzero(live))]
            self._counts = self._counts.at[mx.array(alive), picked].add(1.0)
        return self._logprobs(raw, tokens, slots)

    def verify(
        self,
        logits: mx.array,
        slots: np.ndarray,
        index: np.ndarray,
        drafts: mx.array,
        caps: np.ndarray,
        masks: dict[int, np.ndarray] | None = None,
        q: mx.array | None = None,
        sampled_q: np.ndarray | None = None,
    ) -> Verified:
        """Check each row's drafts against the target (speculative decoding).

        logits: (rows, W, V), position j of row i being token number index[i] + j given the
        row's drafts before it; drafts: (rows, W - 1); caps: (rows,) real drafts per row.
        Position j is processed exactly as `sample` would process that token (penalties
        counting the drafts before it, bias, bans, masks, temperature, filters, seed).
        Rows with q (drafts drawn from the drafter's distribution, `sampled_q`) follow
        `spec.rejection`; the others have one-hot q: the row's own sample at each position,
        accepted while it equals the draft. Penalty counts are left to `count` (the caller
        knows which tokens were emitted).
        """
        rows, width, vocab = logits.shape
        flat_slots = np.repeat(slots, width)
        flat_index = (index[:, None] + np.arange(width)[None, :]).reshape(-1)
        raw = logits.astype(mx.float32)
        extra = None
        if width > 1 and self._counts is not None and self.penalised[slots].any():
            extra = _draft_counts(drafts, vocab)
        flat_masks = {r * width: m for r, m in masks.items()} if masks else None
        x = self._process(raw.reshape(-1, vocab), flat_slots, flat_index, flat_masks, extra)
        tokens = self._choose(x, flat_slots, flat_index).reshape(rows, width)
        match = (tokens[:, :-1] == drafts) & (
            mx.arange(width - 1)[None, :] < mx.array(caps)[:, None]
        )
        accepted = mx.cumprod(match.astype(mx.int32), axis=1).sum(axis=1)
        if q is not None and sampled_q is not None and sampled_q.any():
            from services.decoder.spec import rejection  # the spec package builds on this one

            temp = self.temp[flat_slots]
            p = mx.exp(self._target_lp(x, flat_slots, temp)).reshape(rows, width, vocab)
            toks_q, acc_q = rejection.verify(p, q, drafts, mx.array(caps), self.seed[slots], index)
            use = mx.array(sampled_q)
            tokens = mx.where(use[:, None], toks_q, tokens)
            accepted = mx.where(use, acc_q, accepted)
        first = self._logprobs(raw[:, 0], tokens[:, 0], slots)
        return Verified(tokens, accepted, first)

    def count(self, slots: np.ndarray, tokens: np.ndarray) -> None:
        """Add emitted tokens to the penalty counts (speculative steps, after verifying)."""
        if self._counts is not None and len(slots):
            self._counts = self._counts.at[mx.array(slots), mx.array(tokens)].add(1.0)

    def _process(
        self,
        raw: mx.array,
        slots: np.ndarray,
        index: np.ndarray,
        masks: dict[int, np.ndarray] | None,
        extra: mx.array | None = None,
    ) -> mx.array:
        """Penalties, bias, min_tokens bans and constraint masks on (rows, V) fp32 logits."""
        x = raw
        if self.penalised[slots].any():
            x = self._penalise(x, slots, extra)
        x = self._bias(x, slots)
        x = self._ban(x, slots, index)
        if masks:  # adding 0 keeps a value exactly; -inf removes it (never touches `raw`)
            rows = mx.array(list(masks))
            allowed = mx.array(np.stack(list(masks.values())))
            x = x.at[rows].add(mx.where(allowed, 0.0, -mx.inf))
        return x

    def _choose(self, x: mx.array, slots: np.ndarray, index: np.ndarray) -> mx.array:
        temp = self.temp[slots]
        greedy = mx.argmax(x, axis=-1)
        tokens = greedy
        if (temp > 0).any():
            drawn = self._draw(x, slots, index, temp)
            tokens = drawn if (temp > 0).all() else mx.where(mx.array(temp > 0), drawn, greedy)
        return tokens.astype(mx.int32)

    def _start_penalties(self, slot: int, prompt_ids: list[int]) -> None:
        rows = len(self.temp)
        if self._counts is None or self._seen is None:
            self._counts = mx.zeros((rows, self.vocab), mx.float32)
            self._seen = mx.zeros((rows, self.vocab), mx.bool_)
        seen = np.zeros(self.vocab, bool)
        seen[[t for t in prompt_ids if 0 <= t < self.vocab]] = True
        self._counts[slot] = mx.zeros((self.vocab,), mx.float32)
        self._seen[slot] = mx.array(seen)

    def _penalise(self, x: mx.array, slots: np.ndarray, extra: mx.array | None) -> mx.array:
        assert self._counts is not None and self._seen is not None
        idx = mx.array(slots)
        counts, seen = self._counts[idx], self._seen[idx]
        if extra is not None:  # drafted tokens before each verified position count too
            counts = counts + extra
        rp = mx.array(self.rep[slots])[:, None]
        seen = seen | (counts > 0)
        # Rows without penalties have rp 1 and zero weights: their logits come out unchanged.
        x = mx.where(seen, mx.where(x > 0, x / rp, x * rp), x)
        x = x - mx.array(self.frequency[slots])[:, None] * counts
        return x - mx.array(self.presence[slots])[:, None] * (counts > 0).astype(x.dtype)

    def _bias(self, x: mx.array, slots: np.ndarray) -> mx.array:
        if not self.bias:
            return x
        rows, toks, vals = [], [], []
        for slot, (t, v) in self.bias.items():
            for row in np.flatnonzero(slots == slot):  # a slot has W rows in a verify step
                rows.append(np.full(len(t), row, np.int32))
                toks.append(t)
                vals.append(v)
        if not rows:
            return x
        r, t = mx.array(np.concatenate(rows)), mx.array(np.concatenate(toks))
        return x.at[r, t].add(mx.array(np.concatenate(vals)))

    def _ban(self, x: mx.array, slots: np.ndarray, index: np.ndarray) -> mx.array:
        if not self.bans:
            return x
        under = np.flatnonzero(index < self.min_tokens[slots])
        pairs = [(row, self.bans[int(slots[row])]) for row in under if int(slots[row]) in self.bans]
        if not pairs:
            return x
        r = np.concatenate([np.full(len(b), row, np.int32) for row, b in pairs])
        t = np.concatenate([b for _, b in pairs])
        return x.at[mx.array(r), mx.array(t)].add(-mx.inf)  # functional: `raw` stays raw

    def _draw(
        self, x: mx.array, slots: np.ndarray, index: np.ndarray, temp: np.ndarray
    ) -> mx.array:
        lp = self._target_lp(x, slots, temp)
        return mx.argmax(lp + gumbel_noise(self.seed[slots], index, lp.shape[-1]), axis=-1)

    def _target_lp(self, x: mx.array, slots: np.ndarray, temp: np.ndarray) -> mx.array:
        """The log-probabilities a row samples from: temperature, then top-k/min-p/top-p."""
        t = mx.array(np.where(temp > 0, temp, 1.0).astype(np.float32))[:, None]
        lp = x / t
        lp = lp - mx.logsumexp(lp, axis=-1, keepdims=True)
        return self._filter(lp, slots)

    def _filter(self, lp: mx.array, slots: np.ndarray) -> mx.array:
        """top-k, min-p and top-p, each keeping a prefix of the sorted order, so together
        they keep the shortest of the three prefixes (shared.runtime.sampling's rules)."""
        k, p, mp = self.top_k[slots], self.top_p[slots], self.min_p[slots]
        if not ((k > 0).any() or (p < 1).any() or (mp > 0).any()):
            return lp
        vocab = lp.shape[-1]
        ordered = -mx.sort(-lp, axis=-1)
        keep = mx.array(np.where((k > 0) & (k < vocab), k, vocab).astype(np.int32))
        if (mp > 0).any():
            floor = ordered[:, :1] + mx.log(mx.array(mp))[:, None]  # log(0) = -inf: keep all
            keep = mx.minimum(keep, (ordered >= floor).sum(axis=-1).astype(mx.int32))
        if (p < 1).any():
            probs = mx.exp(ordered)
            before = mx.cumsum(probs, axis=-1) - probs
            limit = mx.array(np.where(p < 1, p, 2.0).astype(np.float32))[:, None]
            keep = mx.minimum(keep, (before < limit).sum(axis=-1).astype(mx.int32))
        cut = mx.take_along_axis(ordered, mx.maximum(keep, 1)[:, None] - 1, axis=-1)
        return mx.where(lp < cut, -mx.inf, lp)

    def _logprobs(self, raw: mx.array, tokens: mx.array, slots: np.ndarray) -> Sampled:
        want = self.want[slots]
        if not (want >= 0).any():
            return Sampled(tokens)
        lsm = raw - mx.logsumexp(raw, axis=-1, keepdims=True)
        chosen = mx.take_along_axis(lsm, tokens[:, None], axis=-1)[:, 0]
        k = min(int(want.max()), self.top_logprobs_k, lsm.shape[-1])
        if k <= 0:
            return Sampled(tokens, chosen)
        ids = mx.argpartition(-lsm, k - 1, axis=-1)[:, :k]
        return Sampled(tokens, chosen, ids, mx.take_along_axis(lsm, ids, axis=-1))
