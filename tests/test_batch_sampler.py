"""Per-row sampling in a mixed batch: filters, seeds, penalties, logprobs."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

import mlx.core as mx
import numpy as np
import pytest
from prism.v1 import decoder_pb2

from services.decoder.batch_sampler import BatchSampler, gumbel_noise
from services.decoder.engine import DecoderEngine, Delta, EngineRequest, Finish
from services.decoder.options import LogitsOptions
from services.decoder.servicer import DecoderServicer, to_proto
from services.decoder.token_text import TokenText
from services.gateway.chat import logprobs_json
from shared.api import load
from shared.errors import InvalidRequestError
from shared.runtime import mlx_thread
from shared.runtime.sampling import SamplingParams, filter_logprobs

VOCAB = 300


def sampler_with(rows: list[tuple[SamplingParams, LogitsOptions]], k: int = 0) -> BatchSampler:
    sampler = BatchSampler(len(rows), VOCAB, k)
    for slot, (params, options) in enumerate(rows):
        sampler.add(slot, params, options, prompt_ids=[1, 2, 3])
    return sampler


def test_filters_match_the_single_request_sampler():
    params = [
        SamplingParams(1.0, top_k=7),
        SamplingParams(1.0, top_p=0.3),
        SamplingParams(1.0, min_p=0.05),
        SamplingParams(1.0, top_k=50, top_p=0.8, min_p=0.01),
        SamplingParams(1.0),
    ]
    sampler = sampler_with([(p, LogitsOptions()) for p in params])
    logits = mx.random.normal((len(params), VOCAB), key=mx.random.key(0)) * 3
    lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    ours = np.isfinite(np.array(sampler._filter(lp, np.arange(len(params)))))
    for row, p in enumerate(params):
        want = np.isfinite(np.array(filter_logprobs(lp[row : row + 1], p)))[0]
        assert (ours[row] == want).all(), p


def test_noise_depends_only_on_seed_and_index():
    a = np.array(gumbel_noise(np.array([5, 9, 5]), np.array([3, 3, 3]), VOCAB))
    b = np.array(gumbel_noise(np.array([5]), np.array([3]), VOCAB))
    assert (a[0] == a[2]).all() and (a[0] == b[0]).all() and not (a[0] == a[1]).all()
    assert not (a[0] == np.array(gumbel_noise(np.array([5]), np.array([4]), VOCAB))[0]).all()


def test_greedy_rows_are_untouched_by_their_neighbours():
    busy = LogitsOptions(logit_bias={3: 50.0}, repetition_penalty=1.3, frequency_penalty=0.5)
    sampler = sampler_with([(SamplingParams(), LogitsOptions()), (SamplingParams(), busy)])
    logits = mx.random.normal((2, VOCAB), key=mx.random.key(1))
    out = sampler.sample(logits, np.arange(2), np.zeros(2, np.int64))
    assert out.tokens.tolist() == [int(mx.argmax(logits[0])), 3]


def test_logprobs_stay_raw_under_bans_masks_bias_and_penalties():
    busy = LogitsOptions(
        min_tokens=5,
        banned_until_min=frozenset({0, 1}),
        repetition_penalty=1.5,
        logit_bias={2: 3.0},
    )
    sampler = BatchSampler(2, VOCAB, top_logprobs_k=3)
    sampler.add(0, SamplingParams(), busy, prompt_ids=[1, 2], logprobs=3)
    sampler.add(1, SamplingParams(0.5, seed=1), LogitsOptions(), prompt_ids=[], logprobs=0)
    logits = mx.random.normal((2, VOCAB), key=mx.random.key(2)) * 4
    allowed = np.zeros(VOCAB + 5, bool)
    allowed[10:20] = True
    out = sampler.sample(logits, np.arange(2), np.zeros(2, np.int64), masks={1: allowed[:VOCAB]})
    tokens = out.tokens.tolist()
    assert tokens[0] not in (0, 1) and 10 <= tokens[1] < 20
    lg = np.array(logits, np.float64)
    raw = lg - lg.max(-1, keepdims=True)
    raw -= np.log(np.exp(raw).sum(-1, keepdims=True))
    assert np.allclose(out.logprob.tolist(), [raw[0, tokens[0]], raw[1, tokens[1]]], atol=1e-5)
    assert sorted(out.top_ids.tolist()[0]) == sorted(np.argsort(-raw[0])[:3].tolist())


# ---- on the engine: a tiny Qwen3 --------------------------------------------------------


@pytest.fixture(scope="module")
def model(checkpoint_factory):
    return mlx_thread.run_sync(load, checkpoint_factory("qwen3", "hf"), components=["language"])


@contextmanager
def running(model, **kwargs) -> Iterator[DecoderEngine]:
    engine = DecoderEngine(model, "tiny", max_num_batched_tokens=24, max_num_seqs=6, **kwargs)
    engine.start()
    try:
        yield engine
    finally:
        engine.shutdown()


def prompt(model, text: str):
    return model.processor([{"role": "user", "content": text}])


async def streams(engine: DecoderEngine, requests: list[EngineRequest]) -> list[list[Delta]]:
    async def one(handle) -> list[Delta]:
        out = []
        async for event in handle:
            if isinstance(event, Finish):
                assert event.reason in ("stop", "length"), event
                return out
            out.append(event)
        raise AssertionError("no Finish")

    handles = [engine.submit(r) for r in requests]
    return await asyncio.gather(*(one(h) for h in handles))


def ids(deltas: list[Delta]) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


def test_seeded_sampling_is_reproducible_in_any_batch_mix(model):
    seeded = [
        EngineRequest("s1", prompt(model, "Once upon a time"), max_tokens=24, ignore_eos=True,
                      sampling=SamplingParams(0.9, top_p=0.9, top_k=40, seed=7)),
        EngineRequest("s2", prompt(model, "A fox"), max_tokens=20, ignore_eos=True,
                      sampling=SamplingParams(1.2, min_p=0.02, seed=11),
                      logits=LogitsOptions(repetition_penalty=1.2, presence_penalty=0.3,
                                           frequency_penalty=0.2, logit_bias={9: 2.0})),
    ]  # fmt: skip
    others = [
        EngineRequest(f"o{i}", prompt(model, "Noise " * (i + 1)), max_tokens=8 + 3 * i,
                      sampling=SamplingParams(temperature=0.7 * (i % 2)),
                      logits=LogitsOptions(frequency_penalty=0.5 * (i % 3), logit_bias={i: 1.0}))
        for i in range(5)
    ]  # fmt: skip
    with running(model) as engine:
        alone = [ids(asyncio.run(streams(engine, [r]))[0]) for r in seeded]
        for mix in (others[:2] + seeded + others[2:], [seeded[1], *others[::-1], seeded[0]]):
            out = asyncio.run(streams(engine, mix))
            got = {r.request_id: ids(d) for r, d in zip(mix, out, strict=True)}
            assert [got["s1"], got["s2"]] == alone
        unseeded = [EngineRequest("u", seeded[0].prompt, max_tokens=24, ignore_eos=True,
                                  sampling=SamplingParams(0.9, top_p=0.9, top_k=40))]  # fmt: skip
        assert ids(asyncio.run(streams(engine, unseeded))[0]) != alone[0]  # 1 in 40^24 to flake


def reference_logprobs(model, prompt_ids: list[int], tokens: list[int]) -> np.ndarray:
    """log_softmax (numpy, float64) of the model's logits for each generated position."""
    seq = mx.array([prompt_ids + tokens[:-1]])
    logits = np.array(model.language(seq)[0, len(prompt_ids) - 1 :], dtype=np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def test_logprobs_equal_the_reference_log_softmax(model):
    asked = [
        EngineRequest("g", prompt(model, "Tell me a story."), max_tokens=12, logprobs=True,
                      top_logprobs=3),
        EngineRequest("t", prompt(model, "Hello"), max_tokens=10, logprobs=True,
                      sampling=SamplingParams(1.5, seed=3)),  # raw logprobs, not tempered
        EngineRequest("n", prompt(model, "No logprobs here"), max_tokens=9),
    ]  # fmt: skip
    with running(model, top_logprobs_k=5) as engine:
        out = asyncio.run(streams(engine, asked))
        with pytest.raises(InvalidRequestError, match="top_logprobs"):
            engine.submit(EngineRequest("x", asked[0].prompt, logprobs=True, top_logprobs=6))
    for req, deltas in zip(asked, out, strict=True):
        tokens = ids(deltas)
        lps = [lp for d in deltas for lp in d.logprobs]
        if not req.logprobs:
            assert lps == []
            continue
        ref = mlx_thread.run_sync(reference_logprobs, model, req.prompt.input_ids, tokens)
        assert [lp.token_id for lp in lps] == tokens
        for pos, lp in enumerate(lps):
            assert abs(lp.logprob - ref[pos, lp.token_id]) < 1e-5
            assert len(lp.top) == req.top_logprobs
            best = np.argsort(-ref[pos])[: req.top_logprobs]
            assert [t for t, _ in lp.top] == best.tolist()
            assert all(abs(v - ref[pos, t]) < 1e-5 for t, v in lp.top)
    # The servicer's proto: each token's text and raw bytes (which concatenate to the text).
    special = set(model.tokenizer.all_special_ids)
    protos = [to_proto(d, TokenText(model.tokenizer)).delta for d in out[0]]
    assert all(len(lp.top_logprobs) == 3 for p in protos for lp in p.logprobs)
    raw = b"".join(lp.bytes for p in protos for lp in p.logprobs if lp.token_id not in special)
    assert raw.decode("utf-8", errors="replace") == "".join(d.text for d in out[0])


def test_top_logprobs_are_refused_unless_the_server_allows_them(model):
    async def scenario(engine: DecoderEngine) -> None:
        with pytest.raises(InvalidRequestError, match="top-logprobs-k"):
            engine.submit(EngineRequest("x", prompt(model, "Hi"), logprobs=True, top_logprobs=1))
        [deltas] = await streams(engine, [EngineRequest("y", prompt(model, "Hi"), max_tokens=3,
                                                        logprobs=True)])  # fmt: skip
        assert all(len(d.logprobs) == 1 and d.logprobs[0].top == () for d in deltas)

    with running(model) as engine:
        asyncio.run(scenario(engine))


class Context:
    """The part of grpc.aio.ServicerContext the decoder servicer uses."""

    def time_remaining(self) -> float | None:
        return None


def test_logprobs_reach_the_openai_shape_through_the_servicer(model):
    request = decoder_pb2.GenerateRequest(
        model="tiny",
        messages=decoder_pb2.Messages(
            messages=[decoder_pb2.ChatMessage(role="user", content=[{"text": "Hi there"}])],
            add_generation_prompt=True,
        ),
        stop=decoder_pb2.StopConditions(max_tokens=5, ignore_eos=True),
        output=decoder_pb2.OutputOptions(logprobs=True, top_logprobs=2),
    )

    async def scenario(engine: DecoderEngine) -> list:
        servicer = DecoderServicer(engine, cache=None)  # type: ignore[arg-type] - no media
        return [r async for r in servicer.Generate(request, Context())]  # type: ignore[arg-type]

    with running(model, top_logprobs_k=2) as engine:
        replies = asyncio.run(scenario(engine))
    lps = [lp for r in replies if r.HasField("delta") for lp in r.delta.logprobs]
    shape = logprobs_json(lps)
    assert len(shape["content"]) == 5 and shape["refusal"] is None
    for entry, lp in zip(shape["content"], lps, strict=True):
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert entry["bytes"] == list(lp.bytes) and entry["logprob"] == lp.logprob
        assert len(entry["top_logprobs"]) == 2
        assert entry["top_logprobs"][0]["logprob"] >= entry["top_logprobs"][1]["logprob"]
        assert entry["top_logprobs"][0]["logprob"] >= entry["logprob"]
