"""Faults across the process boundary, on one stack of two encoders and two decoders behind
one gateway: load spreading, dead encoders, features lost from the cache (also between one
request's Encode and its Generate), a client that goes away mid-stream, and one request id
followed through every process.

The gateway reaches each decoder through a transparent gRPC proxy (`tests/grpc_proxy.py`), so
a test can act at an exact point of a request's way and see what the decoders answered."""

from __future__ import annotations

import collections
import json
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import openai
import pytest

from services.launcher import Stack
from shared.api import LoadedModel, generate, load
from tests.e2e_support import (
    MAX_TOKENS,
    MODEL_ID,
    data_uri,
    decoder_stats,
    e2e_config,
    eventually,
    gateway_metric,
    image_part,
    log_records,
    log_text,
    png_bytes,
    reset_cache,
    user,
)
from tests.grpc_proxy import GrpcProxy, OneShot

GENERATE = "/prism.v1.Decoder/Generate"


@pytest.fixture(scope="module")
def proxies() -> Iterator[list[GrpcProxy]]:
    made = [GrpcProxy(), GrpcProxy()]
    yield made
    for proxy in made:
        proxy.close()


@pytest.fixture(scope="module")
def stack(
    checkpoint_factory: Any, tmp_path_factory: pytest.TempPathFactory, proxies: list[GrpcProxy]
) -> Iterator[Stack]:
    checkpoint = checkpoint_factory("qwen2_5_vl", "hf")
    tmp = tmp_path_factory.mktemp("faults")
    config = e2e_config(
        checkpoint,
        tmp,
        num_encoders=2,
        num_decoders=2,
        gateway_decoders=[p.address for p in proxies],
        # The cache logs each call (with its request id) at DEBUG only: it is the hot path.
        cache_args=["--log-level", "DEBUG"],
    )
    stack = Stack(config)
    for index, proxy in enumerate(proxies):
        proxy.connect(stack.address("decoder", index))
    with stack as running:
        yield running


@pytest.fixture(scope="module")
def reference(checkpoint_factory: Any) -> LoadedModel:
    """The same checkpoint in-process: what the services must reproduce token for token."""
    return load(checkpoint_factory("qwen2_5_vl", "hf"))


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


def test_features_evicted_between_encode_and_decode(
    stack: Stack, client: openai.OpenAI, proxies: list[GrpcProxy], reference: LoadedModel
) -> None:
    """The cache is emptied after the gateway's Encode, just before its Generate reaches a
    decoder: the decoder names the missing key (FAILED_PRECONDITION), the gateway encodes the
    image again and retries once, and the client gets the in-process text as if nothing
    happened."""
    messages = user(image_part(data_uri(png_bytes(300))))
    evict = OneShot(GENERATE, lambda: reset_cache(stack.address("cache")))
    seen = [len(p.calls_to(GENERATE)) for p in proxies]
    for proxy in proxies:
        proxy.before_call = evict
    try:
        text = ask(client, messages)
    finally:
        for proxy in proxies:
            proxy.before_call = None
    assert text == generate(reference, messages, max_tokens=MAX_TOKENS, temperature=0.0)
    assert evict.fired == 1 and isinstance(evict.result, int) and evict.result >= 1
    calls = [c for p, n in zip(proxies, seen, strict=True) for c in p.calls_to(GENERATE)[n:]]
    codes = collections.Counter(c.code for c in calls)
    assert codes == {grpc.StatusCode.FAILED_PRECONDITION: 1, grpc.StatusCode.OK: 1}, calls
    (refused,) = (c for c in calls if c.code != grpc.StatusCode.OK)
    key = refused.trailers["prism-missing-feature-keys"]
    assert len(key) == 64 and "," not in key  # one sha256 content key: the image's

    def encoded() -> list[dict[str, Any]]:
        return [
            r for r in log_records(stack, "encoder") if r.get("event") == "encoded"
            and r.get("key") == key[:16]
        ]  # fmt: skip

    # Encoded twice: once before the eviction, once more for the retry (never a cache hit).
    eventually(lambda: len(encoded()) == 2, timeout=10, what="two `encoded` lines for the image")
    (rid,) = {r["request_id"] for r in encoded()}  # both for this one request
    retries = [
        r["keys"]
        for r in log_records(stack, "gateway")
        if r.get("event") == "features_missing_reencoding" and r.get("request_id") == rid
    ]
    assert retries == [[key]]  # the gateway retried once, for this key


def test_gateway_recovers_after_a_cache_reset(stack: Stack, client: openai.OpenAI) -> None:
    image = user(image_part(data_uri(png_bytes(301))))
    first = ask(client, image)
    assert reset_cache(stack.address("cache")) >= 1
    assert ask(client, image) == first  # recomputed transparently, same greedy text


def test_request_id_reaches_every_service(stack: Stack, client: openai.OpenAI) -> None:
    """A client's X-Request-Id comes back on the response and is on the log lines each process
    writes for the request: gateway, encoder, decoder, and the cache calls of both."""
    rid = str(uuid.uuid4())
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL_ID,
        messages=user(image_part(data_uri(png_bytes(400)))),  # new content: really encoded
        max_tokens=MAX_TOKENS,
        temperature=0,
        extra_headers={"X-Request-Id": rid},
    )
    assert raw.headers["x-request-id"] == rid
    assert raw.parse().choices[0].finish_reason in ("stop", "length")

    def events(component: str) -> set[str]:
        return {
            str(r.get("method") if r.get("event") == "rpc_done" else r.get("event"))
            for r in log_records(stack, component)
            if r.get("request_id") == rid
        }

    wanted = {
        "gateway": {"access"},
        "encoder": {"encoded"},
        "decoder": {"generated"},
        # Get (header only: is it cached?) and Put from the encoder, Get from the decoder.
        "cache": {f"/prism.v1.Cache/{m}" for m in ("Put", "Get")},
    }
    for component, names in wanted.items():
        eventually(
            lambda c=component, n=names: n <= events(c),
            timeout=10,
            what=f"{component} log lines with the request id",
        )
    access = [r for r in log_records(stack, "gateway") if r.get("request_id") == rid]
    assert [(r["path"], r["status"]) for r in access if r["event"] == "access"] == [
        ("/v1/chat/completions", 200)
    ]


def _load(stack: Stack) -> dict[str, float]:
    """The gateway's own request gauges and each decoder's running, waiting and KV usage."""
    out = {
        "gateway running": gateway_metric(stack, "prism:num_requests_running"),
        "gateway waiting": gateway_metric(stack, "prism:num_requests_waiting"),
    }
    for i, address in enumerate(stack.addresses("decoder")):
        stats = decoder_stats(address)
        out[f"decoder-{i} running"] = stats.num_requests_running
        out[f"decoder-{i} waiting"] = stats.num_requests_waiting
        out[f"decoder-{i} kv"] = stats.kv_cache_usage
    return out


def _total(load: dict[str, float], what: str) -> float:
    return sum(v for k, v in load.items() if k.startswith("decoder") and k.endswith(what))


def test_client_disconnect_cancels_decoding(stack: Stack) -> None:
    """The client goes away after 3 chunks of an endless stream: within a second the gateway's
    running/waiting gauges, the decoders' running/waiting and their KV usage are back at their
    idle values (no leftover request anywhere), and the decoder stopped generating."""
    decoders = stack.addresses("decoder")
    eventually(
        lambda: all(v == 0 for k, v in _load(stack).items() if not k.endswith("kv")),
        timeout=10,
        what="an idle stack",
    )
    idle = _load(stack)
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
        # The request shows everywhere while it streams, else "back to idle" proves nothing.
        busy = _load(stack)
        assert (busy["gateway running"], busy["gateway waiting"]) == (1, 0), busy
        assert (_total(busy, "running"), _total(busy, "waiting")) == (1, 0), busy
        assert _total(busy, "kv") > _total(idle, "kv"), busy  # its KV is held
    # The connection is closed; "within a second" is the poll's deadline, not a sleep.
    seen: dict[str, float] = {}

    def idle_again() -> bool:
        seen.update(_load(stack))
        return seen == idle

    try:
        eventually(idle_again, timeout=1.0, what=f"gauges and KV usage back to {idle}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last seen {seen}") from None
    generated = sum(decoder_stats(a).generation_tokens_total for a in decoders) - tokens_before
    assert generated < 1_000  # a few dozen in practice: stopped within steps of the disconnect
