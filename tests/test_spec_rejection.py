"""Speculative sampling preserves the target's distribution (a statistical test with a fixed
seed), and the host pieces of drafting (prompt lookup) do what they say.

Bound: N = 40000 rows per check on a 6-token vocabulary; the chi-square statistic of each
emitted position's histogram against the target probabilities must stay under 20.5 (the
0.1% critical value for 5 degrees of freedom) and the total-variation distance under 0.015
(its expected size here is ~0.005). Seeds are fixed, so the test is deterministic.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from services.decoder.spec import rejection
from services.decoder.spec.ngram import lookup
from shared.runtime import mlx_thread

N, V = 40_000, 6
P = np.array(
    [
        [0.30, 0.05, 0.25, 0.10, 0.20, 0.10],
        [0.02, 0.40, 0.08, 0.30, 0.10, 0.10],
        [0.15, 0.15, 0.15, 0.15, 0.20, 0.20],
    ]
)  # target at positions 0, 1 and the bonus position 2
Q = np.array(
    [
        [0.10, 0.30, 0.30, 0.05, 0.05, 0.20],  # a poor drafter at position 0
        [0.02, 0.38, 0.10, 0.30, 0.10, 0.10],  # a good one at position 1
    ]
)
CHI2_999, TV_MAX = 20.5, 0.015


def check(tokens: np.ndarray, p: np.ndarray) -> None:
    counts = np.bincount(tokens, minlength=V)
    expected = p * len(tokens)
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    tv = 0.5 * float(np.abs(counts / len(tokens) - p).sum())
    assert chi2 < CHI2_999 and tv < TV_MAX, (chi2, tv, counts)


def run(caps: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    drafts = np.stack([rng.choice(V, N, p=Q[j]) for j in range(2)], axis=1)
    p = mx.broadcast_to(mx.array(P.astype(np.float32)), (N, 3, V))
    q = mx.broadcast_to(mx.array(Q.astype(np.float32)), (N, 2, V))
    tokens, accepted = rejection.verify(
        p, q, mx.array(drafts.astype(np.int32)), mx.array(caps),
        np.arange(N, dtype=np.uint32), np.zeros(N, np.int64),
    )  # fmt: skip
    return np.array(tokens), np.array(accepted), drafts


def test_rejection_sampling_preserves_the_target_distribution():
    tokens, accepted, drafts = mlx_thread.run_sync(run, np.full(N, 2))
    check(tokens[:, 0], P[0])  # the first emitted token: accepted draft or residual draw
    two = accepted >= 1
    check(tokens[two, 1], P[1])  # the second, whenever a row emitted one
    three = accepted == 2
    check(tokens[three, 2], P[2])  # the bonus token after two accepted drafts
    np.testing.assert_array_equal(tokens[two, 0], drafts[two, 0])  # accepted = the draft
    # Acceptance rate of draft 0 is sum(min(p, q)) (the drafters' overlap).
    assert abs(two.mean() - np.minimum(P[0], Q[0]).sum()) < 0.01


def test_a_cap_below_k_draws_the_next_token_from_the_target():
    tokens, accepted, _ = mlx_thread.run_sync(run, np.full(N, 1))
    assert accepted.max() == 1
    check(tokens[accepted == 1, 1], P[1])  # not the residual: draft 2 was never proposed


def test_one_hot_q_accepts_with_the_target_probability():
    """A deterministic drafter (prompt lookup) always proposes token 2: accepted with p(2)."""
    drafts = np.full((N, 1), 2)

    def go() -> tuple[np.ndarray, np.ndarray]:
        p = mx.broadcast_to(mx.array(P[:2].astype(np.float32)), (N, 2, V))
        q = mx.array(np.eye(V, dtype=np.float32)[drafts])
        out = rejection.verify(
            p, q, mx.array(drafts.astype(np.int32)), mx.full((N,), 1),
            np.arange(N, dtype=np.uint32), np.zeros(N, np.int64),
        )  # fmt: skip
        return np.array(out[0]), np.array(out[1])

    tokens, accepted = mlx_thread.run_sync(go)
    check(tokens[:, 0], P[0])
    assert abs(accepted.mean() - P[0, 2]) < 0.01


def test_prompt_lookup():
    assert lookup([1, 2, 3, 4, 1, 2], 3) == [3, 4, 1]  # "1 2" seen before: what followed
    assert lookup([5, 1, 2, 9, 7, 1, 2], 2) == [9, 7]
    assert lookup([1, 2, 3], 2) == []  # 3 never appeared before
    assert lookup([7, 7, 7, 7], 5) == [7]  # the latest match has one token after it
    assert lookup([1, 2, 3, 9, 2, 3, 1, 2, 3], 2, max_n=3) == [9, 2]  # the longest n wins
    assert lookup([4, 4], 0) == []


def test_verify_processes_each_position_like_sequential_sampling():
    """Drafts equal to what sequential sampling picks (penalties counting the earlier picks,
    bias, min_tokens bans, filters, seeds) are all accepted, with the same tokens."""
    from services.decoder.batch_sampler import BatchSampler
    from services.decoder.options import LogitsOptions
    from shared.runtime.sampling import SamplingParams

    vocab, width = 12, 4
    rows = [
        (SamplingParams(0.0), LogitsOptions(repetition_penalty=1.5, frequency_penalty=0.8)),
        (SamplingParams(0.9, top_k=6, seed=5), LogitsOptions(presence_penalty=1.0)),
        (
            SamplingParams(0.7, top_p=0.9, seed=9),
            LogitsOptions(logit_bias={3: 2.0}, min_tokens=2, banned_until_min=frozenset({4})),
        ),
    ]

    def make() -> BatchSampler:
        sampler = BatchSampler(len(rows), vocab)
        for slot, (params, options) in enumerate(rows):
            sampler.add(slot, params, options, prompt_ids=[1, 2])
        return sampler

    def go() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        logits = mx.array(np.random.default_rng(0).normal(0, 2, (3, width, vocab)), mx.float32)
        slots, index = np.arange(3), np.zeros(3, np.int64)
        seq = make()
        picked = [np.array(seq.sample(logits[:, j], slots, index + j).tokens) for j in range(width)]
        want = np.stack(picked, axis=1)
        got = make().verify(logits, slots, index, mx.array(want[:, :-1]), np.full(3, width - 1))
        return want, np.array(got.tokens), np.array(got.accepted)

    want, tokens, accepted = mlx_thread.run_sync(go)
    np.testing.assert_array_equal(tokens, want)
    assert accepted.tolist() == [width - 1] * 3
