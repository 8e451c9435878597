"""Encoder + cache + decoder as real processes: parity with shared.api, errors, cancellation."""

from __future__ import annotations

import asyncio
import io
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from prism.v1 import (
    cache_pb2,
    cache_pb2_grpc,
    common_pb2,
    decoder_pb2,
    decoder_pb2_grpc,
    encoder_pb2,
    encoder_pb2_grpc,
)

from shared.api import load, stream_generate
from shared.runtime import mlx_thread
from tests.media_samples import sample_video
from tests.service_procs import free_port, start_all

MAX_TOKENS = 16
QUESTION = "What is in this picture?"


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (56, 84, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def stack(checkpoint_factory, tmp_path_factory):
    """Addresses of cache, encoder, VL decoder ("vl") and text decoder ("txt")."""
    vl, txt = checkpoint_factory("qwen2_5_vl", "hf"), checkpoint_factory("qwen3", "hf")
    taken: set[int] = set()
    ports = {name: free_port(taken=taken) for name in ("cache", "encoder", "vl", "txt")}
    cache = f"127.0.0.1:{ports['cache']}"
    services = start_all(
        [
            ("services.cache", ["--memory-mb", "64"], ports["cache"]),
            ("services.encoder", ["--model", str(vl), "--served-model-name", "vl",
                                  "--cache", cache], ports["encoder"]),
            ("services.decoder", ["--model", str(vl), "--served-model-name", "vl",
                                  "--cache", cache, "--max-waiting", "4"], ports["vl"]),
            ("services.decoder", ["--model", str(txt), "--served-model-name", "txt",
                                  "--cache", cache], ports["txt"]),
        ],
        tmp_path_factory.mktemp("decoder-logs"),
    )  # fmt: skip
    yield {name: f"127.0.0.1:{port}" for name, port in ports.items()}
    codes = {s.log.name: s.stop() for s in reversed(services)}
    assert set(codes.values()) == {0}, codes  # SIGTERM drains and exits cleanly


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> bytes:
    return Path(
        sample_video(tmp_path_factory.mktemp("video") / "clip.mp4", 12, (64, 48))
    ).read_bytes()


@pytest.fixture(scope="module")
def reference(checkpoint_factory, clip):
    """In-process greedy output (text, token ids, prompt ids) for each prompt of these tests."""

    def run():
        out = {}
        for name, family, messages in [
            ("vl", "qwen2_5_vl", [{"role": "user", "content": [
                {"type": "image", "image": png(3)}, {"type": "text", "text": QUESTION}]}]),
            ("video", "qwen2_5_vl", [{"role": "user", "content": [
                {"type": "video", "video": clip}, {"type": "text", "text": QUESTION}]}]),
            ("txt", "qwen3", [{"role": "user", "content": "Tell me a story."}]),
        ]:  # fmt: skip
            model = load(checkpoint_factory(family, "hf"))
            chunks = list(stream_generate(model, messages, max_tokens=MAX_TOKENS))
            ids = model.processor(messages).input_ids
            out[name] = ("".join(c.text for c in chunks), [c.token for c in chunks], ids)
        return out

    return mlx_thread.run_sync(run)


def text_part(text: str) -> decoder_pb2.ContentPart:
    return decoder_pb2.ContentPart(text=text)


def chat(model: str, parts: list[decoder_pb2.ContentPart], **kwargs) -> decoder_pb2.GenerateRequest:
    kwargs.setdefault("stop", decoder_pb2.StopConditions(max_tokens=MAX_TOKENS))
    message = decoder_pb2.ChatMessage(role="user", content=parts)
    return decoder_pb2.GenerateRequest(
        model=model,
        messages=decoder_pb2.Messages(messages=[message], add_generation_prompt=True),
        **kwargs,
    )


async def generate(address: str, request: decoder_pb2.GenerateRequest):
    """(text, token ids, texts per delta, finish)."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = decoder_pb2_grpc.DecoderStub(channel)
        deltas, finish = [], None
        async for reply in stub.Generate(request, timeout=60):
            if reply.HasField("delta"):
                deltas.append(reply.delta)
            else:
                finish = reply.finish
        text = "".join(d.text for d in deltas)
        return text, [t for d in deltas for t in d.token_ids], [d.text for d in deltas], finish


async def encode(
    address: str, data: bytes, modality: int = common_pb2.MODALITY_IMAGE
) -> common_pb2.MediaFeatureRef:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = encoder_pb2_grpc.EncoderStub(channel)
        item = encoder_pb2.MediaItem(modality=modality, data=data)
        reply = await stub.Encode(encoder_pb2.EncodeRequest(model="vl", items=[item]), timeout=60)
        return reply.items[0].ref


def test_health_and_models(stack):
    with grpc.insecure_channel(stack["vl"]) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(service="prism.v1.Decoder"), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = decoder_pb2_grpc.DecoderStub(channel)
        [info] = stub.ListModels(common_pb2.ListModelsRequest(), timeout=5).models
        assert (info.id, info.family, info.max_context_tokens > 0) == ("vl", "qwen2_5_vl", True)


def test_image_prompt_matches_in_process_and_stops_across_tokens(stack, reference):
    want_text, want_ids, _ = reference["vl"]

    async def scenario() -> None:
        ref = await encode(stack["encoder"], png(3))
        parts = [decoder_pb2.ContentPart(media=ref), text_part(QUESTION)]
        text, ids, pieces, finish = await generate(stack["vl"], chat("vl", parts))
        assert (text, ids) == (want_text, want_ids)
        assert finish.usage.completion_tokens == len(want_ids)
        assert finish.timings.feature_fetch_ns > 0 and finish.timings.prefill_ns > 0

        i = next(i for i in range(len(pieces) - 1) if pieces[i] and pieces[i + 1])
        stop = pieces[i][-1] + pieces[i + 1][0]  # spans a token boundary
        request = chat("vl", parts, stop=decoder_pb2.StopConditions(max_tokens=16, stop=[stop]))
        text, _, pieces, finish = await generate(stack["vl"], request)
        assert text == want_text[: want_text.index(stop)] and stop not in "".join(pieces)
        assert finish.reason == decoder_pb2.FINISH_REASON_STOP and finish.stop_sequence == stop

    asyncio.run(scenario())


def test_video_prompt_matches_in_process(stack, reference, clip):
    async def scenario() -> None:
        ref = await encode(stack["encoder"], clip, common_pb2.MODALITY_VIDEO)
        assert ref.seconds_per_grid > 0 and ref.grid[0] > 1  # carried to M-RoPE positions
        parts = [decoder_pb2.ContentPart(media=ref), text_part(QUESTION)]
        assert (await generate(stack["vl"], chat("vl", parts)))[:2] == reference["video"][:2]

    asyncio.run(scenario())


def test_text_prompt_and_token_prompt_match_in_process(stack, reference):
    want_text, want_ids, prompt_ids = reference["txt"]

    async def scenario() -> None:
        text, ids, _, finish = await generate(
            stack["txt"], chat("txt", [text_part("Tell me a story.")])
        )
        assert (text, ids) == (want_text, want_ids)
        assert finish.usage.prompt_tokens == len(prompt_ids)
        request = decoder_pb2.GenerateRequest(
            model="txt",
            tokens=decoder_pb2.TokenPrompt(token_ids=prompt_ids),
            stop=decoder_pb2.StopConditions(max_tokens=MAX_TOKENS),
        )
        assert (await generate(stack["txt"], request))[:2] == (want_text, want_ids)

    asyncio.run(scenario())


def test_missing_features_fail_with_their_keys(stack):
    async def scenario() -> None:
        ref = await encode(stack["encoder"], png(11))
        async with grpc.aio.insecure_channel(stack["cache"]) as channel:
            await cache_pb2_grpc.CacheStub(channel).Reset(cache_pb2.CacheResetRequest(), timeout=5)
        parts = [decoder_pb2.ContentPart(media=ref), text_part(QUESTION)]
        async with grpc.aio.insecure_channel(stack["vl"]) as channel:
            call = decoder_pb2_grpc.DecoderStub(channel).Generate(chat("vl", parts), timeout=30)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in call:
                    pytest.fail("nothing may be streamed before the features are fetched")
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        trailers = dict(err.value.trailing_metadata() or ())
        assert trailers["prism-missing-feature-keys"].split(",") == [ref.content_key]

    asyncio.run(scenario())


def test_cancel_mid_stream_frees_the_engine(stack):
    async def scenario() -> None:
        async with grpc.aio.insecure_channel(stack["txt"]) as channel:
            stub = decoder_pb2_grpc.DecoderStub(channel)
            endless = decoder_pb2.StopConditions(max_tokens=4000, ignore_eos=True)
            long = chat("txt", [text_part("Go on.")], stop=endless)
            call = stub.Generate(long, timeout=60)
            seen = 0
            async for _ in call:
                seen += 1
                if seen == 3:
                    call.cancel()
                    break
            deadline = time.monotonic() + 10
            while True:  # the engine notices within a step; poll its stats, never guess
                stats = await stub.Stats(decoder_pb2.DecoderStatsRequest(), timeout=5)
                if stats.num_requests_running == 0 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
            assert (stats.num_requests_running, stats.num_requests_waiting) == (0, 0)
            assert stats.generation_tokens_total < 4000
        _, ids, _, finish = await generate(stack["txt"], chat("txt", [text_part("Hi")]))
        assert finish.reason in (decoder_pb2.FINISH_REASON_LENGTH, decoder_pb2.FINISH_REASON_STOP)
        assert 0 < len(ids) <= MAX_TOKENS

    asyncio.run(scenario())


def test_request_errors_map_to_status_codes(stack):
    image = decoder_pb2.ContentPart(
        media=common_pb2.MediaFeatureRef(
            content_key="k", modality=common_pb2.MODALITY_IMAGE, num_tokens=4, grid=[1, 4, 4]
        )
    )
    cases = [
        (chat("nope", [text_part("hi")]), grpc.StatusCode.NOT_FOUND, "not served"),
        (
            chat("txt", [text_part("hi")], sampling=decoder_pb2.SamplingParams(temperature=-1)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "temperature",
        ),
        (chat("txt", [image, text_part("hi")]), grpc.StatusCode.INVALID_ARGUMENT, "accepts: text"),
    ]

    async def scenario() -> None:
        for request, code, words in cases:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await generate(stack["txt"], request)
            assert err.value.code() == code and words in err.value.details()

    asyncio.run(scenario())
