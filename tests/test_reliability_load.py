"""Faults and load across real processes on loopback (issue #9): 100 concurrent streams of
which 10 are cancelled (the other 90 exact), channels idle past their keepalive, and a request
whose deadline runs out during the encode.

Two stacks: `stack` with a one-second gRPC keepalive and rare health checks (so its channels
really idle), and `deadline_stack` whose gateway gives each request three seconds, with a
proxy between the cache and its clients (encoder, decoder) that can hold their calls."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import openai
import pytest

from services.launcher import Stack
from shared.api import LoadedModel, generate, load
from shared.rpc.channels import KEEPALIVE_ENV
from shared.rpc.logging import REQUEST_ID_KEY
from tests.e2e_support import (
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
    user,
)
from tests.grpc_proxy import GrpcProxy

KEEPALIVE_S = 1.0
STREAMS, CANCELLED = 100, 10
LOAD_TOKENS = 8  # per surviving stream: 2 slow CPU cores decode all of them at once
VICTIM_TOKENS = 2_000  # a cancelled stream could only end early by being cancelled
REQUEST_TIMEOUT_S = 3.0  # deadline_stack's gateway --request-timeout
# What "bounded by the request" may read over it: deadlines are rounded on the wire and a busy
# host notices a cancel late. The alternative it rules out is the clients' own 30 s timeout.
SLACK_S = 0.5


@pytest.fixture(scope="module")
def reference(checkpoint_factory: Any) -> LoadedModel:
    """The same checkpoint in-process: greedy fp32, what every stream must reproduce."""
    return load(checkpoint_factory("qwen2_5_vl", "hf"))


@pytest.fixture(scope="module")
def stack(checkpoint_factory: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    config = e2e_config(
        checkpoint_factory("qwen2_5_vl", "hf"),
        tmp_path_factory.mktemp("load"),
        # All 100 streams go to one decoder: 32 run at once, and the default queue (64) would
        # refuse some of the rest.
        decoder_args=["--max-waiting", str(2 * STREAMS)],
        # Every process pings after a second of silence; the keepalive trace logs each ping,
        # so the idle test can see that its channels really went quiet that long.
        env={KEEPALIVE_ENV: str(KEEPALIVE_S), "GRPC_TRACE": "http_keepalive"},
    )
    # Health checks every 0.5 s would keep the gateway's channels busy: check once, at start.
    config.gateway_args += ["--health-interval", "600"]
    with Stack(config) as running:
        yield running


def _stream_body(prompt: str, max_tokens: int, **extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL_ID,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        **extra,
    }


@dataclass
class Outcome:
    status: int
    text: str = ""
    chunks: int = 0  # chunks with a choice
    finish: str | None = None
    done: bool = False  # the stream's `data: [DONE]` arrived


async def _stream(http: httpx.AsyncClient, body: dict[str, Any], cut_after: int) -> Outcome:
    """One streamed completion; with `cut_after` > 0 the client hangs up after that many
    chunks (closing an unread streaming response closes its connection)."""
    async with http.stream("POST", "/v1/chat/completions", json=body) as reply:
        out = Outcome(reply.status_code)
        if reply.status_code != 200:
            return out
        async for line in reply.aiter_lines():
            if line == "data: [DONE]":
                out.done = True
            elif line.startswith("data: "):
                choices = json.loads(line[6:])["choices"]
                if choices:
                    out.chunks += 1
                    out.text += choices[0]["delta"].get("content") or ""
                    out.finish = choices[0]["finish_reason"] or out.finish
            if cut_after and out.chunks >= cut_after:
                return out
    return out


def test_cancel_10_of_100_concurrent_streams(stack: Stack, reference: LoadedModel) -> None:
    """100 streams at once, each with its own prompt; 10 of them (endless, so they can only end
    by being cancelled) hang up after 3 chunks while the rest decode. The other 90 get exactly
    the text a single in-process greedy run gives, and the cancelled ones leave nothing
    behind in the decoder."""
    prompts = [f"Item {i}: say something." for i in range(STREAMS)]
    victims = set(range(0, STREAMS, STREAMS // CANCELLED))
    expected = {
        i: generate(
            reference,
            [{"role": "user", "content": p}],
            max_tokens=LOAD_TOKENS,
            temperature=0.0,
        )
        for i, p in enumerate(prompts)
        if i not in victims
    }
    decoder = stack.address("decoder")
    tokens_before = decoder_stats(decoder).generation_tokens_total

    async def run_all() -> list[Outcome]:
        limits = httpx.Limits(max_connections=2 * STREAMS, max_keepalive_connections=0)
        async with httpx.AsyncClient(
            base_url=stack.gateway_url, timeout=120, limits=limits
        ) as http:
            return await asyncio.gather(
                *(
                    _stream(http, _stream_body(p, VICTIM_TOKENS, ignore_eos=True), cut_after=3)
                    if i in victims
                    else _stream(http, _stream_body(p, LOAD_TOKENS), cut_after=0)
                    for i, p in enumerate(prompts)
                )
            )

    outcomes = asyncio.run(run_all())
    assert [o.status for o in outcomes] == [200] * STREAMS
    for i in victims:
        assert outcomes[i].chunks == 3 and not outcomes[i].done, outcomes[i]
    got = {i: o.text for i, o in enumerate(outcomes) if i not in victims}
    wrong = {i: (got[i], expected[i]) for i in expected if got[i] != expected[i]}
    assert not wrong, f"{len(wrong)} of {len(expected)} streams differ: {wrong}"
    assert all(outcomes[i].done and outcomes[i].finish in ("stop", "length") for i in expected)

    # Cancelled means gone from the decoder: 10 uncancelled streams would run on for
    # thousands of tokens.
    def idle() -> bool:
        stats = decoder_stats(decoder)
        return (stats.num_requests_running, stats.num_requests_waiting) == (0, 0)

    eventually(idle, timeout=10, what="the decoder to drop the cancelled streams")
    assert gateway_metric(stack, "prism:num_requests_running") == 0
    assert gateway_metric(stack, "prism:num_requests_waiting") == 0
    generated = decoder_stats(decoder).generation_tokens_total - tokens_before
    assert generated < len(expected) * LOAD_TOKENS + CANCELLED * VICTIM_TOKENS // 4, generated


# ---- idle channels ---------------------------------------------------------------------------
# gRPC core's trace (GRPC_TRACE=http_keepalive) writes a line per keepalive ping a client sends,
# naming the peer; an error (a GOAWAY "too_many_pings" from a server that refuses the pings,
# say) is a glog line starting with E.
_PING = re.compile(r"CLIENT\[\w+\]: Ping \d+ sent \[ipv4:127\.0\.0\.1:(\d+)\]")
_GLOG_ERROR = re.compile(r"^[EF]\d{4} ", re.MULTILINE)


def _ask(client: openai.OpenAI, messages: list[dict[str, Any]]) -> str:
    reply = client.chat.completions.create(
        model=MODEL_ID, messages=messages, max_tokens=LOAD_TOKENS, temperature=0
    )
    return reply.choices[0].message.content or ""


def test_idle_channels_outlive_their_keepalive(stack: Stack, reference: LoadedModel) -> None:
    """Every channel of the request path (gateway -> encoder, gateway -> decoder, encoder ->
    cache, decoder -> cache) idles until its client has sent three keepalive pings, then one
    request uses them all: it succeeds, exactly, and no process logged an error or warning
    meanwhile (a server refusing the pings answers GOAWAY, logged as an error)."""
    client = openai.OpenAI(base_url=stack.base_url, api_key="unused", max_retries=0, timeout=60)
    first = user(image_part(data_uri(png_bytes(700))))
    assert _ask(client, first) == generate(
        reference, first, max_tokens=LOAD_TOKENS, temperature=0.0
    )  # every channel is connected now
    port = {
        name: int(stack.address(name).rsplit(":", 1)[1]) for name in ("encoder", "decoder", "cache")
    }
    channels = {  # client process -> the ports it holds a channel to
        "gateway": {port["encoder"], port["decoder"]},
        "encoder": {port["cache"]},
        "decoder": {port["cache"]},
    }
    marks = {c.name: len(log_text(stack, *_split(c.name))) for c in stack.all_children()}

    def since_mark(name: str) -> str:
        return log_text(stack, *_split(name))[marks[name] :]

    def pinged_enough() -> bool:
        for component, peers in channels.items():
            sent = [int(p) for p in _PING.findall(since_mark(f"{component}-0"))]
            if any(sent.count(peer) < 3 for peer in peers):
                return False
        return True

    eventually(pinged_enough, timeout=20 * KEEPALIVE_S, what="3 keepalive pings per channel")
    second = user(image_part(data_uri(png_bytes(701))))  # new content: encoded and stored
    assert _ask(client, second) == generate(
        reference, second, max_tokens=LOAD_TOKENS, temperature=0.0
    )
    for name in marks:
        text = since_mark(name)
        assert not _GLOG_ERROR.search(text) and "GOAWAY" not in text, f"{name}:\n{text[-3000:]}"
        for line in text.splitlines():
            if line.startswith("{"):
                level = json.loads(line).get("level")
                assert level not in ("warning", "error", "critical"), f"{name}: {line}"


def _split(name: str) -> tuple[str, int]:
    component, index = name.rsplit("-", 1)
    return component, int(index)


# ---- deadlines -------------------------------------------------------------------------------
class HangingCache(GrpcProxy):
    """Sits between the cache and its clients (encoder, decoder). Records the time each call
    had left when it arrived (the caller's deadline, as passed on the wire), and holds every
    call to `hang` without forwarding it until its caller gives up: a cache that hangs, so the
    encode outlasts any deadline."""

    def __init__(self) -> None:
        super().__init__()
        self.hang: str | None = None
        self.arrivals: list[tuple[str, str, float | None]] = []  # (method, request id, left)
        self.held: list[float] = []  # seconds each held call waited for its caller to give up

    def _prepare(self, method: str, context: grpc.ServicerContext) -> dict[str, Any]:
        rid = dict(context.invocation_metadata()).get(REQUEST_ID_KEY, "")
        with self._lock:
            self.arrivals.append((method, str(rid), context.time_remaining()))
        if self.hang is not None and method.endswith(self.hang):
            gone = threading.Event()
            if not context.add_callback(gone.set):  # already over
                gone.set()
            start = time.monotonic()
            gone.wait(60)  # the caller's deadline or cancel ends the wait, not this timeout
            with self._lock:
                self.held.append(time.monotonic() - start)
            context.abort(grpc.StatusCode.UNAVAILABLE, "held until the caller gave up")
        return super()._prepare(method, context)


@pytest.fixture(scope="module")
def hanging_cache() -> Iterator[HangingCache]:
    proxy = HangingCache()
    yield proxy
    proxy.close()


@pytest.fixture(scope="module")
def deadline_stack(
    checkpoint_factory: Any, tmp_path_factory: pytest.TempPathFactory, hanging_cache: HangingCache
) -> Iterator[Stack]:
    config = e2e_config(
        checkpoint_factory("qwen2_5_vl", "hf"),
        tmp_path_factory.mktemp("deadline"),
        # Encoder and decoder reach the cache through the proxy (the later --cache wins). DEBUG
        # logs each finished call, so the test sees the encoder's Encode handler end.
        encoder_args=["--cache", hanging_cache.address, "--log-level", "DEBUG"],
        decoder_args=["--cache", hanging_cache.address],
    )
    config.gateway_args += ["--request-timeout", str(REQUEST_TIMEOUT_S)]
    stack = Stack(config)
    hanging_cache.connect(stack.address("cache"))
    with stack as running:
        yield running


def _cache_calls(proxy: HangingCache, rid: str) -> list[tuple[str, float | None]]:
    """(method name, seconds left on arrival) of the request's calls to the cache."""
    return [(m.rsplit("/", 1)[1], left) for m, r, left in proxy.arrivals if r == rid]


def _within_the_request(calls: list[tuple[str, float | None]]) -> bool:
    """Each call carried this request's remaining time, not a timeout of its own (30 s)."""
    return all(left is not None and 0 < left <= REQUEST_TIMEOUT_S + SLACK_S for _, left in calls)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_deadline_shorter_than_the_encode(
    deadline_stack: Stack, hanging_cache: HangingCache, reference: LoadedModel, stream: bool
) -> None:
    """The encoder's Put of the features hangs past the request's deadline: the client gets a
    504 in OpenAI's error shape when the deadline passes (not whenever the encode would end),
    the encoder's calls to the cache carried the request's remaining time (not a timeout of
    their own), and nothing keeps running: the Encode call ended, nothing was stored, no
    decoder saw the request, the gauges are back at zero, no backend was marked down. The same
    image then succeeds, every cache call of it (encoder's and decoder's) again bounded by
    the request's deadline."""
    stack = deadline_stack
    decoder = stack.address("decoder")
    requests_before = decoder_stats(decoder).requests_total
    rid = uuid.uuid4().hex
    messages = user(image_part(data_uri(png_bytes(800 + stream))))
    body = {
        "model": MODEL_ID, "messages": messages, "max_tokens": 4, "temperature": 0,
        "stream": stream,
    }  # fmt: skip
    hanging_cache.hang = "/prism.v1.Cache/Put"
    try:
        start = time.monotonic()
        reply = httpx.post(
            stack.base_url + "/chat/completions",
            json=body,
            headers={"X-Request-Id": rid},
            timeout=30,
        )
        elapsed = time.monotonic() - start
        # The held Put is let go when the encoder gives up on it, at the deadline.
        eventually(lambda: len(hanging_cache.held) == 1, timeout=5, what="the held Put to end")
    finally:
        hanging_cache.hang = None
    held = hanging_cache.held.pop()
    assert reply.status_code == 504, reply.text
    error = {"message": "request timed out", "type": "timeout", "param": None, "code": "timeout"}
    assert reply.json() == {"error": error}  # OpenAI's error shape
    assert REQUEST_TIMEOUT_S - 0.1 < elapsed < REQUEST_TIMEOUT_S + 3, elapsed
    assert held < REQUEST_TIMEOUT_S + SLACK_S, held

    # The lookup (header-only Get) and the Put both had less than the request's timeout left.
    calls = _cache_calls(hanging_cache, rid)
    assert "Put" in [m for m, _ in calls] and _within_the_request(calls), calls

    def encode_ended() -> bool:
        return any(
            r.get("event") == "rpc_done" and r.get("method") == "/prism.v1.Encoder/Encode"
            for r in log_records(stack, "encoder")
            if r.get("request_id") == rid
        )

    eventually(encode_ended, timeout=5, what="the encoder's Encode call to end")
    events = {r.get("event") for r in log_records(stack, "encoder") if r.get("request_id") == rid}
    assert "encoded" not in events, events  # the features were never stored
    stats = decoder_stats(decoder)
    assert (stats.requests_total, stats.num_requests_running, stats.num_requests_waiting) == (
        requests_before, 0, 0
    )  # fmt: skip
    assert gateway_metric(stack, "prism:num_requests_running") == 0
    assert gateway_metric(stack, "prism:num_requests_waiting") == 0
    gateway = log_records(stack, "gateway")
    access = [
        r["status"] for r in gateway if r.get("event") == "access" and r.get("request_id") == rid
    ]
    assert access == [504]
    # A request out of time says nothing about the backend's health.
    assert not [r for r in gateway if r.get("event") == "backend_down"]

    # The cache answers again: the same image is encoded (it was never stored) and decoded.
    rid = uuid.uuid4().hex
    reply = httpx.post(
        stack.base_url + "/chat/completions",
        json={**body, "stream": False},
        headers={"X-Request-Id": rid},
        timeout=30,
    )
    assert reply.status_code == 200, reply.text
    text = reply.json()["choices"][0]["message"]["content"]
    assert text == generate(reference, messages, max_tokens=4, temperature=0.0)
    calls = _cache_calls(hanging_cache, rid)
    # Encoder: lookup and Put; decoder: the features' Get. All bounded by this request.
    assert [m for m, _ in calls].count("Get") >= 2 and _within_the_request(calls), calls
