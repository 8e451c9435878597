"""Verifying drafted tokens against the target: the standard speculative-sampling rule.

Leviathan et al. / Chen et al.: draft token x (drawn from q) is accepted with probability
min(1, p(x) / q(x)); at the first rejection the token is drawn from norm(max(p - q, 0)); when
every draft is accepted one more token is drawn from p at the next position. The emitted
tokens are then distributed exactly as the target's own samples. For a deterministic drafter
(prompt lookup, greedy drafting) q is one-hot; `batch_sampler` takes a shortcut there (the
row's own sample at each position, accepted while it equals the draft), which is the same rule.

Randomness is counter-based, like the sampler's: from (seed, token index) only.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from services.decoder.batch_sampler import _GOLDEN, _mix_np, gumbel_noise

# Salts that give the acceptance coin, the residual draw and the drafter's own draw streams
# independent of the target sampler's noise (which uses the bare seed).
ACCEPT_SALT, RESIDUAL_SALT, DRAFT_SALT = 0x5BD1E995, 0x27D4EB2F, 0x165667B1


def uniforms(seeds: np.ndarray, index: np.ndarray) -> np.ndarray:
    """(n,) uniforms in (0, 1) determined by each (seed, token index) pair."""
    with np.errstate(over="ignore"):
        key = _mix_np(
            seeds.astype(np.uint32) ^ _mix_np(index.astype(np.uint32) * np.uint32(_GOLDEN))
        )
    return ((key >> 8).astype(np.float64) + 0.5) / (1 << 24)


def verify(
    p: mx.array,
    q: mx.array,
    drafts: mx.array,
    caps: mx.array,
    seeds: np.ndarray,
    index: np.ndarray,
) -> tuple[mx.array, mx.array]:
    """Speculative sampling for rows whose drafts came from distributions `q`.

    p: (rows, K + 1, V) target probabilities at each position; q: (rows, K, V) the drafter's;
    drafts: (rows, K) int; caps: (rows,) how many drafts each row really proposed (<= K);
    seeds/index: (rows,) each row's seed and the token index of its position 0.
    Returns (tokens (rows, K + 1), accepted (rows,)): the row emits tokens[:accepted + 1].
    """
    rows, width, vocab = p.shape
    k = width - 1
    pos = index[:, None] + np.arange(width)[None, :]  # (rows, width) token indices
    u = uniforms(np.repeat(seeds ^ np.uint32(ACCEPT_SALT), k), pos[:, :k].reshape(-1))
    u = mx.array(u.reshape(rows, k).astype(np.float32))
    p_draft = mx.take_along_axis(p[:, :k], drafts[..., None], axis=-1)[..., 0]
    q_draft = mx.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
    ok = (u * q_draft < p_draft) & (mx.arange(k)[None, :] < caps[:, None])
    accepted = mx.cumprod(ok.astype(mx.int32), axis=1).sum(axis=1)
    # Where the draft existed the fallback is the residual; past a row's cap it is p itself.
    residual = mx.maximum(p[:, :k] - q, 0.0)
    has_draft = (mx.arange(k)[None, :] < caps[:, None])[..., None]
    fallback = mx.concatenate([mx.where(has_draft, residual, p[:, :k]), p[:, k:]], axis=1)
    # p == q exactly leaves no residual mass; then any token is fine (never reached: the
    # draft is always accepted there), so fall back to p to keep the draw defined.
    empty = fallback.sum(axis=-1, keepdims=True) <= 0
    fallback = mx.where(empty, p, fallback)
    seeds_r = np.repeat(seeds ^ np.uint32(RESIDUAL_SALT), width)
    noise = gumbel_noise(seeds_r, pos.reshape(-1), vocab).reshape(rows, width, vocab)
    drawn = mx.argmax(mx.log(fallback) + noise, axis=-1).astype(mx.int32)
    padded = mx.concatenate([drafts.astype(mx.int32), drawn[:, k:]], axis=1)
    tokens = mx.where(mx.arange(width)[None, :] < accepted[:, None], padded, drawn)
    return tokens, accepted
