"""Speculative decoding in the continuous batch (fp32, tiny random checkpoints): greedy output
with every drafter is token-identical to the engine without drafting, alone and in a mixed
batch of 8, with a drafter that is always right (a copy of the target: acceptance 1) and one
that is always wrong (acceptance 0); seeded sampling with prompt lookup is identical too (a
one-hot drafter's verification draws each position with the row's own noise)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

import mlx.core as mx
import numpy as np
import pytest

from services.decoder.engine import DecoderEngine, Delta, EngineRequest, Finish, LogitsOptions
from services.decoder.spec.base import Proposal
from shared.api import load
from shared.runtime import mlx_thread
from shared.runtime.sampling import SamplingParams

ROWS, BUDGET, K = 8, 64, 3
TEXTS = [
    "the cat sat on the mat. the cat sat on the mat. the cat",
    "Tell me about the fox.",
    "a b c a b c a b c a b",
    "Why? " * 6,
    "one two three four five six seven eight",
    "x",
    "the fox jumps over the dog and the fox jumps over",
    "Summarise: " + "lorem ipsum dolor " * 4,
]


@pytest.fixture(scope="module")
def target(checkpoint_factory):
    path = checkpoint_factory("qwen3", "hf")
    model = mlx_thread.run_sync(lambda: load(path, components=["language"]))
    prompts = [model.processor([{"role": "user", "content": t}]) for t in TEXTS]
    return path, model, prompts


@contextmanager
def running(model, **kwargs) -> Iterator[DecoderEngine]:
    engine = DecoderEngine(model, "t", max_num_batched_tokens=BUDGET, max_num_seqs=ROWS, **kwargs)
    engine.start()
    try:
        yield engine
    finally:
        engine.shutdown()


def requests(prompts, **kwargs) -> list[EngineRequest]:
    return [
        EngineRequest(f"r{i}", p, max_tokens=12 + 3 * i, ignore_eos=True, **kwargs)
        for i, p in enumerate(prompts)
    ]


async def consume(handle) -> tuple[list[int], str, Finish]:
    tokens, text = [], ""
    async for event in handle:
        if isinstance(event, Delta):
            tokens += event.token_ids
            text += event.text
        else:
            return tokens, text, event
    raise AssertionError("no Finish")


async def run_all(engine: DecoderEngine, reqs: list[EngineRequest], together: bool) -> list:
    if not together:
        return [await consume(engine.submit(r)) for r in reqs]
    handles = [engine.submit(r) for r in reqs]
    return [await consume(h) for h in handles]


def generate(model, reqs, together=True, **engine_kwargs) -> tuple[list, DecoderEngine]:
    with running(model, **engine_kwargs) as engine:
        out = asyncio.run(run_all(engine, reqs, together))
    return out, engine


@pytest.fixture(scope="module")
def reference(target):
    _, model, prompts = target
    out, _ = generate(model, requests(prompts), together=False)
    return out


@pytest.mark.parametrize("kind", ["ngram", "draft"])
@pytest.mark.parametrize("together", [True, False])
def test_greedy_identical_to_no_drafting(target, reference, kind, together):
    path, model, prompts = target
    draft = str(path) if kind == "draft" else ""  # a copy of the target: always right
    out, engine = generate(
        model, requests(prompts), together, draft_kind=kind, draft_model=draft,
        num_draft_tokens=K,
    )  # fmt: skip
    for i, ((tokens, text, fin), (want, want_text, _)) in enumerate(
        zip(out, reference, strict=True)
    ):
        assert tokens == want, f"row {i}"
        assert text == want_text and fin.reason == "length"
    spec = engine.core.spec
    assert spec.drafted > 0
    if kind == "draft":
        assert spec.accepted == spec.drafted  # a copy of the target never misses
        assert spec.tokens_per_step > 2


class WrongDrafter:
    """Proposes a token the target never emits: acceptance 0, output unchanged."""

    kind, k = "wrong", K

    def __init__(self, never: int) -> None:
        self.never = never

    def start(self, slot: int, prompt_ids: list[int]) -> None:
        pass

    def release(self, slot: int) -> None:
        pass

    def propose(self, rows, caps, index, seeds, temps) -> Proposal:
        drafts = mx.full((len(rows), self.k), self.never, mx.int32)
        return Proposal(drafts, np.minimum(caps, self.k))

    def accepted(self, accepted: np.ndarray) -> None:
        assert not accepted.any()


def test_always_wrong_drafter_changes_nothing(target, reference):
    _, model, prompts = target
    used = {t for tokens, _, _ in reference for t in tokens}
    never = next(t for t in range(model.language.args.vocab_size) if t not in used)
    with running(model) as engine:
        engine.core.drafter = engine.runner.drafter = WrongDrafter(never)
        out = asyncio.run(run_all(engine, requests(prompts), True))
    assert [o[0] for o in out] == [r[0] for r in reference]
    spec = engine.core.spec
    assert spec.drafted > 0 and spec.accepted == 0 and spec.tokens_per_step == 1.0


def test_seeded_sampling_with_prompt_lookup_is_identical(target):
    _, model, prompts = target
    sampling = SamplingParams(temperature=0.9, top_p=0.95, seed=7)
    reqs = requests(prompts, sampling=sampling)
    want, _ = generate(model, reqs)
    got, engine = generate(model, requests(prompts, sampling=sampling), draft_kind="ngram")
    assert [o[0] for o in got] == [o[0] for o in want]
    assert engine.core.spec.drafted > 0


class EvenTokens:
    """A constraint: only even token ids (the row decodes without drafting, same batch)."""

    def allowed(self) -> np.ndarray:
        mask = np.zeros(4096, bool)
        mask[::2] = True
        return mask

    def accept(self, token: int) -> None:
        assert token % 2 == 0

    def finished(self) -> bool:
        return False


def option_requests(prompts, reference) -> list[EngineRequest]:
    """Every per-row option next to drafting rows: penalties, bias, min_tokens, stop strings
    and stop ids that land inside accepted runs, EOS on, logprobs, a constraint."""
    r = requests(prompts)
    out0 = reference[0][0]
    r[0].logits = LogitsOptions(repetition_penalty=1.3, presence_penalty=0.4)
    r[1].logits = LogitsOptions(frequency_penalty=0.7, logit_bias={out0[3]: 5.0, 11: -100.0})
    r[2].stop = (reference[2][1][5:8],)  # a stop string a few tokens in
    r[3].stop_token_ids = frozenset({reference[3][0][6]})
    r[4].ignore_eos = False
    r[4].logits = LogitsOptions(min_tokens=5, banned_until_min=frozenset({reference[4][0][2]}))
    r[5].logprobs, r[5].top_logprobs = True, 2
    r[6].constraints = [EvenTokens()]
    r[7].max_tokens = 2
    return r


def test_options_stops_and_mixed_rows_match_no_drafting(target, reference):
    path, model, prompts = target
    kw = dict(top_logprobs_k=2)
    want, _ = generate(model, option_requests(prompts, reference), **kw)
    got, engine = generate(
        model, option_requests(prompts, reference), draft_kind="draft", draft_model=str(path),
        num_draft_tokens=K, **kw,
    )  # fmt: skip
    for i, ((tokens, text, fin), (w_tokens, w_text, w_fin)) in enumerate(
        zip(got, want, strict=True)
    ):
        assert tokens == w_tokens and text == w_text, f"row {i}"
        assert (fin.reason, fin.stop_sequence, fin.completion_tokens) == (
            w_fin.reason, w_fin.stop_sequence, w_fin.completion_tokens
        ), f"row {i}"  # fmt: skip
    assert got[2][2].reason == "stop" and got[3][2].reason == "stop"
    assert engine.core.spec.accepted > 0


def test_logprobs_are_reported_for_non_drafting_rows(target, reference):
    _, model, prompts = target

    async def go(engine: DecoderEngine) -> list:
        req = requests(prompts)[5]
        req.logprobs, req.top_logprobs = True, 2
        lps = []
        async for event in engine.submit(req):
            if isinstance(event, Delta):
                lps += event.logprobs
        return lps

    with running(model, top_logprobs_k=2) as engine:
        want = asyncio.run(go(engine))
    with running(model, top_logprobs_k=2, draft_kind="ngram") as engine:
        got = asyncio.run(go(engine))
    assert [w.token_id for w in want] == [g.token_id for g in got]
    np.testing.assert_allclose([g.logprob for g in got], [w.logprob for w in want], atol=1e-5)
    assert all(len(g.top) == 2 for g in got)


def test_images_with_a_text_drafter(checkpoint_factory):
    """A VLM target (Qwen2.5-VL, M-RoPE positions after the images) with its own language
    half as a text-only drafter (it sees the image placeholder ids) and with prompt lookup."""
    from PIL import Image

    from shared.runtime.generate import encode_media

    path = checkpoint_factory("qwen2_5_vl", "hf")

    def build() -> tuple:
        full = load(path)
        reqs = []
        for i, size in enumerate([(56, 56), None, (84, 56)]):
            parts = [{"type": "text", "text": "Describe it, describe it. " * (i + 1)}]
            if size is not None:
                pixels = np.random.default_rng(i).integers(0, 255, (*size[::-1], 3), np.uint8)
                parts.insert(0, {"type": "image", "image": Image.fromarray(pixels)})
            prompt = full.processor([{"role": "user", "content": parts}])
            features = encode_media(full, prompt.media)
            mx.eval([f.tensors() for f in features])
            reqs.append((prompt, features))
        return load(path, components=["language"]), reqs

    model, built = mlx_thread.run_sync(build)

    def make() -> list[EngineRequest]:
        return [
            EngineRequest(f"v{i}", p, list(f), max_tokens=16, ignore_eos=True)
            for i, (p, f) in enumerate(built)
        ]

    want, _ = generate(model, make())
    for kind, draft in (("draft", str(path)), ("ngram", "")):
        got, engine = generate(model, make(), draft_kind=kind, draft_model=draft)
        assert [g[0] for g in got] == [w[0] for w in want], kind
        assert engine.core.spec.drafted > 0


def test_sampled_drafts_from_a_copy_are_accepted(target):
    """Temperature > 0 with a draft model: drafts are drawn from q and verified by the
    rejection rule; with q = p (a copy of the target) every draft is accepted."""
    path, model, prompts = target
    reqs = requests(prompts, sampling=SamplingParams(temperature=0.8, seed=3))
    got, engine = generate(
        model, reqs, draft_kind="draft", draft_model=str(path), num_draft_tokens=K
    )
    assert [len(g[0]) for g in got] == [r.max_tokens for r in reqs]
    spec = engine.core.spec
    assert spec.drafted > 0 and spec.acceptance > 0.95


def test_cancelling_a_drafting_row_leaves_the_others_exact(target, reference):
    path, model, prompts = target

    async def go(engine: DecoderEngine) -> list:
        handles = [engine.submit(r) for r in requests(prompts[:4])]
        out = []
        for i, handle in enumerate(handles):
            tokens = []
            async for event in handle:
                if isinstance(event, Delta):
                    tokens += event.token_ids
                    if i == 1:
                        handle.cancel()  # mid-stream, with drafts in flight
            out.append(tokens)
        return out

    kw = dict(draft_kind="draft", draft_model=str(path), num_draft_tokens=K)
    with running(model, **kw) as engine:
        out = asyncio.run(go(engine))
        again = asyncio.run(run_all(engine, requests(prompts[:2]), True))  # the engine goes on
        assert engine.stats().running == 0
    for i in (0, 2, 3):
        assert out[i] == reference[i][0]
    assert out[1] == reference[1][0][: len(out[1])]
    assert [a[0] for a in again] == [r[0] for r in reference[:2]]
