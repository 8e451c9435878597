"""Faults across the process boundary, on one stack of two encoders and two decoders behind
one gateway: load spreading, dead encoders, features lost from the cache, and a client that
goes away mid-stream."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import openai
import pytest
from prism.v1 import common_pb2, decoder_pb2, decoder_pb2_grpc, encoder_pb2, encoder_pb2_grpc

from services.launcher import Stack
from tests.e2e_support import (
    MAX_TOKENS,
    MODEL_ID,
    data_uri,
    decoder_stats,
    e2e_config,
    eventually,
    image_part,
    log_text,
    png_bytes,
    reset_cache,
    user,
)


@pytest.fixture(scope="module")
def stack(checkpoint_factory: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    checkpoint = checkpoint_factory("qwen2_5_vl", "hf")
    tmp = tmp_path_factory.mktemp("faults")
    with Stack(e2e_config(checkpoint, tmp, num_encoders=2, num_decoders=2)) as running:
        yield running


@pytest.fixture(scope="module")
def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url, api_key="unused", max_retries=0, timeout=120)


def ask(client: openai.OpenAI, messages: list[dict[str, Any]]) -> str:
    reply = client.chat.completions.create(
        model=MODEL_ID, messages=messages, max_tokens=MAX_TOKENS, temperature=0
    )
    return reply.choices[0].message.content or ""


def test_two_encoders_and_two_decoders_both_get_traffic(
    stack: Stack, client: openai.OpenAI
) -> None:
    before = [decoder_stats(a).requests_total for a in stack.addresses("decoder")]
    for seed in range(100, 106):  # distinct images: each one is really encoded somewhere
        ask(client, user(image_part(data_uri(png_bytes(seed)))))
    after = [decoder_stats(a).requests_total for a in stack.addresses("decoder")]
    assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)
    for i in range(2):
        assert '"encoded"' in log_text(stack, "encoder", i), f"encoder-{i} got no work"


def test_dead_encoders_fail_image_requests_with_503_text_still_works(
    stack: Stack, client: openai.OpenAI
) -> None:
    others = {c.name: c.pid for c in stack.all_children() if not c.name.startswith("encoder")}
    image = user(image_part(data_uri(png_bytes(200))))
    try:
        for i in range(2):
            stack.kill("encoder", i)
        with pytest.raises(openai.APIStatusError) as info:
            ask(client, image)
        assert info.value.status_code == 503
        assert "encoder" in str(info.value.message).lower()
        ask(client, [{"role": "user", "content": "Still there?"}])  # text needs no encoder
    finally:  # later tests need the encoders back
        for i in range(2):
            stack.restart("encoder", i)
    # The gateway's health loop notices the encoders again; nothing else was restarted.
    eventually(lambda: _succeeds(client, image), timeout=30, what="image requests to recover")
    assert {c.name: c.pid for c in stack.all_children() if c.name in others} == others


def _succeeds(client: openai.OpenAI, messages: list[dict[str, Any]]) -> bool:
    try:
        ask(client, messages)
    except openai.APIStatusError as exc:
        assert exc.status_code == 503, exc
        return False
    return True


def test_features_evicted_between_encode_and_decode(stack: Stack) -> None:
    """The decoder names the missing keys; encoding again makes the same request work."""
    item = encoder_pb2.MediaItem(modality=common_pb2.MODALITY_IMAGE, data=png_bytes(300))
    encode = encoder_pb2.EncodeRequest(model=MODEL_ID, items=[item])
    with grpc.insecure_channel(stack.address("encoder")) as channel:
        (first,) = encoder_pb2_grpc.EncoderStub(channel).Encode(encode, timeout=60).items
        assert reset_cache(stack.address("cache")) >= 1
        with grpc.insecure_channel(stack.address("decoder")) as dchannel:
            decoder = decoder_pb2_grpc.DecoderStub(dchannel)
            with pytest.raises(grpc.RpcError) as info:
                list(decoder.Generate(_generate_request(first.ref), timeout=60))
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            trailers = dict(info.value.trailing_metadata() or ())
            assert trailers["prism-missing-feature-keys"] == first.ref.content_key
            (again,) = encoder_pb2_grpc.EncoderStub(channel).Encode(encode, timeout=60).items
            assert not again.cache_hit and again.ref.content_key == first.ref.content_key
            events = list(decoder.Generate(_generate_request(again.ref), timeout=60))
    assert events[-1].finish.reason in (
        decoder_pb2.FINISH_REASON_STOP,
        decoder_pb2.FINISH_REASON_LENGTH,
    )


def test_gateway_recovers_after_a_cache_reset(stack: Stack, client: openai.OpenAI) -> None:
    image = user(image_part(data_uri(png_bytes(301))))
    first = ask(client, image)
    assert reset_cache(stack.address("cache")) >= 1
    assert ask(client, image) == first  # recomputed transparently, same greedy text


def _generate_request(ref: common_pb2.MediaFeatureRef) -> decoder_pb2.GenerateRequest:
    content = [decoder_pb2.ContentPart(media=ref), decoder_pb2.ContentPart(text="What is it?")]
    return decoder_pb2.GenerateRequest(
        model=MODEL_ID,
        messages=decoder_pb2.Messages(
            messages=[decoder_pb2.ChatMessage(role="user", content=content)],
            add_generation_prompt=True,
        ),
        stop=decoder_pb2.StopConditions(max_tokens=MAX_TOKENS),
    )


def test_client_disconnect_cancels_decoding(stack: Stack) -> None:
    decoders = stack.addresses("decoder")
    tokens_before = sum(decoder_stats(a).generation_tokens_total for a in decoders)
    body = {
        "model": MODEL_ID,
        "messages": [{"role": "user", "content": "Count forever."}],
        "max_tokens": 20_000,
        "ignore_eos": True,  # vLLM's extension: without it a random model may stop at once
        "stream": True,
    }
    with (
        httpx.Client(base_url=stack.gateway_url, timeout=60) as http,
        http.stream("POST", "/v1/chat/completions", json=body) as reply,
    ):
        assert reply.status_code == 200
        lines = reply.iter_lines()
        deltas = 0
        for line in lines:
            if line.startswith("data: ") and line != "data: [DONE]":
                deltas += bool(json.loads(line[6:])["choices"])
            if deltas >= 3:
                break
        assert sum(decoder_stats(a).num_requests_running for a in decoders) == 1
    # The connection is closed: the decoder must stop well before 20 000 tokens.
    eventually(
        lambda: sum(decoder_stats(a).num_requests_running for a in decoders) == 0,
        timeout=10,
        what="the decoder to drop the cancelled request",
    )
    generated = sum(decoder_stats(a).generation_tokens_total for a in decoders) - tokens_before
    assert generated < 1_000  # a few dozen in practice: stopped within steps of the disconnect
