"""DecoderEngine in-process: parity with shared.api, stop handling, cancellation, queue bound."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from services.decoder.engine import DecoderEngine, Delta, EngineRequest, Finish, LogitsOptions
from services.decoder.stops import StopMatcher
from shared.api import load, stream_generate
from shared.errors import InvalidRequestError, OverloadedError
from shared.media.types import ProcessedPrompt
from shared.runtime import mlx_thread
from shared.runtime.loaded import LoadedModel
from shared.runtime.sampling import SamplingParams

MESSAGES = [{"role": "user", "content": "Tell me a story about a fox."}]


# ---- stop strings on a fake token stream --------------------------------------------------


def run_matcher(stops: list[str], pieces: list[str]) -> tuple[list[str], str | None, str]:
    matcher, emitted = StopMatcher(stops), []
    for piece in pieces:
        text, hit = matcher.feed(piece)
        emitted.append(text)
        if hit is not None:
            return emitted, hit, ""
    return emitted, None, matcher.flush()


def test_stop_string_across_token_boundaries_is_never_emitted():
    emitted, hit, _ = run_matcher(["lo wo"], ["Hel", "lo", " w", "orld"])
    assert hit == "lo wo"
    # "l" may start the stop string, so it is held; "lo" and "lo w" likewise, then dropped.
    assert emitted == ["He", "l", "", ""]
    assert "".join(emitted) == "Hel"


def test_held_text_is_released_when_the_match_fails():
    emitted, hit, tail = run_matcher(["abc"], ["xa", "b", "d", "ab"])
    assert hit is None
    assert emitted == ["x", "", "abd", ""]
    assert tail == "ab"  # released at the end of generation


def test_earliest_of_several_stop_strings_wins():
    emitted, hit, _ = run_matcher(["world", "o w"], ["Hello wor", "ld"])
    assert (hit, "".join(emitted)) == ("o w", "Hell")
    assert run_matcher([], ["a", "b"]) == (["a", "b"], None, "")


# ---- the engine on a tiny Qwen3 -----------------------------------------------------------


@pytest.fixture(scope="module")
def model(checkpoint_factory) -> LoadedModel:
    path = checkpoint_factory("qwen3", "hf")
    return mlx_thread.run_sync(load, path, components=["language"])


@pytest.fixture(scope="module")
def reference(checkpoint_factory) -> tuple[str, list[int], ProcessedPrompt]:
    """shared.api greedy output (the parity target), run before any engine holds the thread."""

    def run() -> tuple[str, list[int], ProcessedPrompt]:
        full = load(checkpoint_factory("qwen3", "hf"))
        chunks = list(stream_generate(full, MESSAGES, max_tokens=24))
        return "".join(c.text for c in chunks), [c.token for c in chunks], full.processor(MESSAGES)

    return mlx_thread.run_sync(run)


@contextmanager
def running(model: LoadedModel, **kwargs) -> Iterator[DecoderEngine]:
    engine = DecoderEngine(model, "tiny", **kwargs)
    engine.start()
    try:
        yield engine
    finally:
        engine.shutdown()


async def collect(engine: DecoderEngine, request: EngineRequest) -> tuple[list[Delta], Finish]:
    deltas, finish = [], None
    async for event in engine.submit(request):
        if isinstance(event, Delta):
            deltas.append(event)
        else:
            finish = event
    assert finish is not None
    return deltas, finish


def request(prompt: ProcessedPrompt, **kwargs) -> EngineRequest:
    return EngineRequest(request_id="t", prompt=prompt, **kwargs)


def test_greedy_matches_shared_api_and_stops_on_strings(model, reference):
    text, tokens, prompt = reference
    with running(model) as engine:
        deltas, finish = asyncio.run(collect(engine, request(prompt, max_tokens=24)))
        assert "".join(d.text for d in deltas) == text
        assert [t for d in deltas for t in d.token_ids] == tokens
        assert finish.reason in ("length", "stop") and finish.completion_tokens == len(tokens)
        assert finish.prompt_tokens == len(prompt.input_ids)
        assert finish.timings.prefill_ns > 0 and finish.timings.decode_ns > 0

        # A stop string spanning two deltas: the text before it, none of it, reason "stop".
        i = next(i for i in range(len(deltas) - 1) if deltas[i].text and deltas[i + 1].text)
        stop = deltas[i].text[-1] + deltas[i + 1].text[0]
        deltas, finish = asyncio.run(collect(engine, request(prompt, max_tokens=24, stop=(stop,))))
        assert "".join(d.text for d in deltas) == text[: text.index(stop)]
        assert (finish.reason, finish.stop_sequence) == ("stop", stop)

        # stop_token_ids end generation on that token, which contributes no text.
        stop_id = tokens[5]
        deltas, finish = asyncio.run(
            collect(engine, request(prompt, max_tokens=24, stop_token_ids=frozenset({stop_id})))
        )
        assert [t for d in deltas for t in d.token_ids] == tokens[: tokens.index(stop_id) + 1]
        assert finish.reason == "stop"


def test_eos_and_ignore_eos(model, reference):
    _, tokens, prompt = reference
    eos = tokens[3]  # pretend the model's EOS is a token it produces early
    fake = dataclasses.replace(model, eos_token_ids=frozenset({eos}))
    with running(fake) as engine:
        deltas, finish = asyncio.run(collect(engine, request(prompt, max_tokens=12)))
        assert finish.reason == "stop" and len(deltas) == tokens.index(eos) + 1
        deltas, finish = asyncio.run(
            collect(engine, request(prompt, max_tokens=12, ignore_eos=True))
        )
        assert (finish.reason, len(deltas)) == ("length", 12)


def test_cancel_frees_the_engine_and_the_queue_is_bounded(model, reference):
    prompt = reference[2]

    async def scenario(engine: DecoderEngine) -> None:
        handle = engine.submit(request(prompt, max_tokens=4000, ignore_eos=True))
        first = await handle.__anext__()  # now it runs: the queue is empty again
        assert isinstance(first, Delta) and engine.stats().running == 1
        queued = engine.submit(request(prompt, max_tokens=1))
        with pytest.raises(OverloadedError):  # max_waiting=1 and one is waiting
            engine.submit(request(prompt, max_tokens=1))
        seen = 1
        async for event in handle:
            seen += 1
            if seen == 3:
                handle.cancel()
            if isinstance(event, Finish):
                assert event.reason == "cancelled"
        assert seen < 100
        # The engine moved on: the queued request runs, then a new one.
        assert [e async for e in queued][-1].reason == "length"
        deltas, finish = await collect(engine, request(prompt, max_tokens=2))
        assert finish.reason == "length" and len(deltas) == 2
        stats = engine.stats()
        assert (stats.running, stats.waiting, stats.requests_total) == (0, 0, 3)

    # One row at a time, so the second request really waits (batching would admit it).
    with running(model, max_waiting=1, max_num_seqs=1) as engine:
        asyncio.run(scenario(engine))


def test_invalid_requests_are_refused_before_queueing(model, reference):
    prompt = reference[2]

    async def scenario(engine: DecoderEngine) -> None:
        bad = [
            request(prompt, sampling=SamplingParams(temperature=-1)),
            request(ProcessedPrompt(input_ids=[])),
            request(ProcessedPrompt(input_ids=[10**9])),
            request(prompt, max_tokens=engine.max_model_len),
        ]
        for req in bad:
            with pytest.raises(InvalidRequestError):
                engine.submit(req)
        assert engine.stats().waiting == 0

    with running(model) as engine:
        asyncio.run(scenario(engine))


def test_logit_bias_and_min_tokens(model, reference):
    _, tokens, prompt = reference
    eos = tokens[1]
    fake = dataclasses.replace(model, eos_token_ids=frozenset({eos}))
    with running(fake) as engine:
        biased = request(prompt, max_tokens=4, logits=LogitsOptions(logit_bias={7: 100.0}))
        deltas, _ = asyncio.run(collect(engine, biased))
        assert [t for d in deltas for t in d.token_ids] == [7, 7, 7, 7]
        # EOS may not end the sequence before min_tokens: it is masked until then.
        held = request(prompt, max_tokens=6, logits=LogitsOptions(min_tokens=4))
        deltas, finish = asyncio.run(collect(engine, held))
        ids = [t for d in deltas for t in d.token_ids]
        assert eos not in ids[:4] and finish.completion_tokens >= 4
