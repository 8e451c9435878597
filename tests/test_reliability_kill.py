"""Faults and load across real processes (issue #9): a decoder killed mid-stream, the cache
service killed and brought back, a cache disk that refuses writes, SIGTERM to each service
while ten clients stream, and the launcher's own shutdown (what `make run-local` runs).

One stack serves the module (an encoder, two decoders, the cache with a disk tier, the
gateway; grace 30 s); each test puts back what it broke. Every completion is compared with the
greedy text the same stack produced before any fault (`references`), so a stream that was cut,
restarted or mixed up fails the comparison; every wait polls a real signal with a deadline.
"""

from __future__ import annotations

import json
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest
from prism.v1 import cache_pb2, cache_pb2_grpc

from services.launcher import Stack
from services.launcher.probes import SERVING, grpc_health
from shared.rpc.ports import free_port
from tests.e2e_support import (
    MODEL_ID,
    data_uri,
    decoder_stats,
    e2e_config,
    eventually,
    log_records,
    png_bytes,
    process_running,
    reset_cache,
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

REPO = Path(__file__).resolve().parents[1]
GRACE = 30.0  # --grace of every service: streams of a few seconds finish well within it
CLIENTS = 10
STREAM_TOKENS = 200  # ten concurrent streams of this take a second or more on a CPU
PROMPTS = [f"Client {i} asks for a long story about the number {i}." for i in range(CLIENTS)]
IMAGE = (224, 224)  # 64 feature tokens: one encode takes tens of milliseconds
BIG_IMAGE = (672, 672)  # with max_pixels = its area: 576 feature tokens, 147 KiB of float32


# ---- a stream, read by hand (exact SSE framing) ----------------------------------------------
@dataclass
class Outcome:
    """What one streaming client saw."""

    status: int = 0
    text: str = ""
    finish: str | None = None
    error: dict[str, Any] | None = None  # an in-band SSE error event
    done: bool = False  # `data: [DONE]` arrived
    failure: str = ""  # the client itself failed (connection refused, reset, timeout)
    started: threading.Event = field(default_factory=threading.Event)  # first content delta


def body(messages: list[dict[str, Any]], max_tokens: int = STREAM_TOKENS) -> dict[str, Any]:
    return {
        "model": MODEL_ID,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,  # a random model may stop at once; this pins the length
        "stream": True,
    }


def text_messages(prompt: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": prompt}]


def image_messages(seed: int, size: tuple[int, int] = IMAGE) -> list[dict[str, Any]]:
    part = {"type": "image_url", "image_url": {"url": data_uri(png_bytes(seed, size))}}
    part["max_pixels"] = size[0] * size[1]  # the checkpoint's default caps it at 64 tokens
    return [{"role": "user", "content": [part, {"type": "text", "text": "Describe it."}]}]


def read_stream(lines: Iterator[str], out: Outcome) -> None:
    """Consume SSE lines into `out` (text, finish reason, in-band error, [DONE])."""
    for line in lines:
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            out.done = True
            continue
        event = json.loads(line[6:])
        if "error" in event:
            out.error = event["error"]
            continue
        for choice in event["choices"]:
            out.text += choice["delta"].get("content") or ""
            out.finish = choice["finish_reason"] or out.finish
            if out.text:
                out.started.set()


def stream_once(url: str, payload: dict[str, Any], out: Outcome) -> None:
    try:
        with (
            httpx.Client(base_url=url, timeout=120) as http,
            http.stream("POST", "/v1/chat/completions", json=payload) as reply,
        ):
            out.status = reply.status_code
            if reply.status_code != 200:
                reply.read()
                out.error = reply.json().get("error")
                return
            read_stream(reply.iter_lines(), out)
    except httpx.HTTPError as exc:
        out.failure = f"{type(exc).__name__}: {exc}"
    finally:
        out.started.set()  # never leave a waiter hanging on a request that failed early


class Load:
    """Concurrent streaming clients, one connection and one thread each."""

    def __init__(self, url: str, payloads: list[dict[str, Any]]) -> None:
        self.outcomes = [Outcome() for _ in payloads]
        self.threads = [
            threading.Thread(target=stream_once, args=(url, p, o), daemon=True)
            for p, o in zip(payloads, self.outcomes, strict=True)
        ]
        for thread in self.threads:
            thread.start()

    def wait_started(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        for out in self.outcomes:
            assert out.started.wait(max(0.0, deadline - time.monotonic())), "a stream never began"
            assert out.status == 200 and out.text, out

    def join(self, timeout: float = 120) -> list[Outcome]:
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in self.threads), "a stream never ended"
        return self.outcomes


def completed(out: Outcome) -> tuple[str, str | None, Any, bool, str]:
    """What a stream that finished normally looks like, for one readable assert."""
    return out.text, out.finish, out.error, out.done, out.failure


def expect_completed(outcomes: list[Outcome], texts: list[str]) -> None:
    got = [completed(o) for o in outcomes]
    assert got == [(t, "length", None, True, "") for t in texts]


# ---- processes ----------------------------------------------------------------------------------
def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (from /proc), so a test can check none outlives it."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        kids = [p for p, parent in parents.items() if parent in frontier]
        found += kids
        frontier = kids
    return found


def cache_stats(address: str, namespace: str = "") -> cache_pb2.CacheStatsResponse:
    with grpc.insecure_channel(address) as channel:
        stub = cache_pb2_grpc.CacheStub(channel)
        return stub.Stats(cache_pb2.CacheStatsRequest(namespace=namespace), timeout=5)


def http_code(url: str, payload: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    """Status and JSON body of one GET (or POST with `payload`); (0, {}) when refused."""
    try:
        with httpx.Client(timeout=60) as http:
            reply = http.post(url, json=payload) if payload is not None else http.get(url)
    except httpx.TransportError:
        return 0, {}
    return reply.status_code, reply.json()


def ready(stack: Stack) -> int:
    return http_code(stack.gateway_url + "/ready")[0]


def events(stack: Stack, component: str, name: str) -> list[dict[str, Any]]:
    return [r for r in log_records(stack, component) if r.get("event") == name]


# ---- the stack ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stack(checkpoint_factory: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("reliability")
    config = e2e_config(
        checkpoint_factory("qwen2_5_vl", "hf"),
        tmp,
        num_decoders=2,
        grace=GRACE,
        cache_disk_path=str(tmp / "disk"),
    )
    with Stack(config) as running:
        yield running
    for child in running.all_children():
        assert child.returncode() is not None, f"{child.name} outlived the stack"


@pytest.fixture(scope="module")
def references(stack: Stack) -> list[str]:
    """The greedy text of each prompt, from the unbroken stack (ten at once: also a warm-up)."""
    outcomes = Load(stack.gateway_url, [body(text_messages(p)) for p in PROMPTS]).join()
    assert all(o.finish == "length" and o.done and not o.error for o in outcomes), outcomes
    return [o.text for o in outcomes]


def ask(stack: Stack, messages: list[dict[str, Any]], max_tokens: int = 16) -> tuple[int, Any]:
    """(status, text or error object) of one non-streaming request."""
    payload = {**body(messages, max_tokens), "stream": False}
    status, reply = http_code(stack.base_url + "/chat/completions", payload)
    if status != 200:
        return status, reply.get("error")
    return status, reply["choices"][0]["message"]["content"]


# ---- 1. a decoder killed mid-stream -------------------------------------------------------------
def test_decoder_killed_mid_stream(stack: Stack, references: list[str]) -> None:
    """SIGKILL the decoder under two open streams: each gets an in-band error event (the
    `openai` client raises APIError) and the stream ends; /ready is 503 until the decoder is
    back, and meanwhile the other replica answers every new request exactly."""
    decoders = stack.addresses("decoder")
    endless = body(text_messages("Count forever."), max_tokens=20_000)
    client = openai.OpenAI(base_url=stack.base_url, api_key="-", max_retries=0, timeout=60)
    with (
        httpx.Client(base_url=stack.gateway_url, timeout=30) as http,
        http.stream("POST", "/v1/chat/completions", json=endless) as raw,
    ):
        raw_out, raw_lines = Outcome(), raw.iter_lines()
        for line in raw_lines:  # a few deltas: decoding is under way
            read_stream(iter([line]), raw_out)
            if len(raw_out.text) >= 3:
                break
        running = [decoder_stats(a).num_requests_running for a in decoders]
        assert sorted(running) == [0, 1], running
        victim = running.index(1)
        # The same request through the openai client, on the same decoder (round robin: the
        # next request goes to the other one; it is closed, which cancels it there).
        sdk_streams = []
        for _ in range(2):
            sdk = client.chat.completions.create(
                model=MODEL_ID,
                messages=endless["messages"],
                max_tokens=endless["max_tokens"],
                temperature=0,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            next(iter(sdk))
            sdk_streams.append(sdk)
            if decoder_stats(decoders[victim]).num_requests_running == 2:
                break
        *elsewhere, sdk = sdk_streams
        assert decoder_stats(decoders[victim]).num_requests_running == 2
        for other in elsewhere:
            other.close()

        stack.kill("decoder", victim)  # SIGKILL: no drain, no goodbye
        read_stream(raw_lines, raw_out)  # returns only once the gateway ends the response
        with pytest.raises(openai.APIError) as info:
            for _ in sdk:
                pass
        sdk.close()
    assert raw_out.error is not None and raw_out.done and raw_out.finish is None
    assert raw_out.error["type"] == "server_error"
    assert raw_out.error["message"].startswith("decoder unavailable"), raw_out.error
    assert str(info.value.message).startswith("decoder unavailable"), info.value

    try:
        status, reply = http_code(stack.gateway_url + "/ready")
        assert status == 503 and any(decoders[victim] in r for r in reply["down"]), reply
        survivor = decoders[1 - victim]
        served = decoder_stats(survivor).requests_total
        for i in range(2):  # every new request lands on the survivor, with the exact text
            assert ask(stack, text_messages(PROMPTS[i]), STREAM_TOKENS) == (200, references[i])
        assert decoder_stats(survivor).requests_total == served + 2
        assert ready(stack) == 503  # still: one decoder is missing
    finally:
        stack.restart("decoder", victim)
    eventually(lambda: ready(stack) == 200, timeout=20, what="/ready back to 200")


# ---- 2. the cache service killed, then back -----------------------------------------------------
def test_cache_killed_text_keeps_working_images_503_then_recover(
    stack: Stack, references: list[str]
) -> None:
    """Without the cache service: text requests are answered exactly (no prefix reuse: the
    decoder logs the outage once and counts its failed calls); image requests get a clean 503
    (their features live in the cache: nothing can encode or fetch them). The cache restarted
    on its port: images work again and prefix blocks reach the cache again."""
    image = image_messages(seed=10)
    status, image_text = ask(stack, image)
    assert status == 200
    fresh = "A prompt nobody sent before, long enough for several prefix blocks. " * 3
    cache = stack.address("cache")
    refused_before = len(events(stack, "encoder", "rpc_refused"))
    stack.kill("cache")  # SIGKILL
    try:
        assert ask(stack, text_messages(PROMPTS[0]), STREAM_TOKENS) == (200, references[0])
        status, fresh_text = ask(stack, text_messages(fresh))
        assert status == 200 and fresh_text
        for messages in (image, image_messages(seed=11)):  # seen before, and new
            status, error = ask(stack, messages)
            assert status == 503 and error["type"] == "server_error", error
        # Why: the encoder could not reach the cache (the gateway then skips that encoder
        # until its next health check, so the second request may not even reach it).
        refused = [
            r for r in events(stack, "encoder", "rpc_refused")[refused_before:]
            if r["code"] == "UNAVAILABLE" and r["error"].startswith(f"cache {cache}")
        ]  # fmt: skip
        assert refused, events(stack, "encoder", "rpc_refused")
        eventually(
            lambda: bool(events(stack, "decoder", "apc_remote_unavailable")),
            timeout=10,
            what="the decoder to log the prefix-cache outage",
        )
    finally:
        stack.restart("cache")
    # Once per outage and decoder (not once per failed call), with the running count.
    outages = events(stack, "decoder", "apc_remote_unavailable")
    assert 1 <= len(outages) <= 2 and all(r["level"] == "warning" for r in outages), outages
    assert all(r["errors"] >= 1 for r in outages), outages
    kv_before = cache_stats(cache, "kv").puts
    eventually(lambda: ask(stack, image) == (200, image_text), timeout=30, what="images back")
    assert ask(stack, text_messages(fresh)) == (200, fresh_text)
    variations = iter(range(1000))

    def all_recovered() -> bool:
        # A decoder notices the cache is back at its next remote call: keep sending new
        # prompts (new blocks to look up and write) until every decoder that saw the outage
        # has had one; round robin spreads them, a decoder marked down meanwhile gets none.
        assert ask(stack, text_messages(f"{fresh} Variation {next(variations)}."))[0] == 200
        return len(events(stack, "decoder", "apc_remote_recovered")) == len(outages)

    eventually(all_recovered, timeout=20, what="each decoder to log its recovery")
    eventually(
        lambda: cache_stats(cache, "kv").puts > kv_before,
        timeout=10,
        what="prefix blocks written to the restarted cache",
    )
    recovered = events(stack, "decoder", "apc_remote_recovered")
    assert all(r["failed_calls"] >= 1 for r in recovered), recovered
    assert ready(stack) == 200


# ---- 3. a cache disk that refuses writes --------------------------------------------------------
def test_cache_disk_full_is_reported_and_requests_succeed(stack: Stack) -> None:
    """The cache's disk refuses writes mid-file, as a full disk does: a file-size limit
    (RLIMIT_FSIZE) on the cache process makes every write past it fail (EFBIG) even for root,
    who would ignore a read-only chmod. The request is answered all the same (the entry stays
    in memory), the failure is counted in `disk_errors` and logged, and the cache keeps
    serving."""
    cache_child = stack.child("cache")
    pid, log_path = cache_child.pid, cache_child.log_path
    assert pid is not None and log_path is not None
    cache = stack.address("cache")
    # Below the 147 KiB feature entry, above what the cache's own log (same limit) will reach.
    limit = log_path.stat().st_size + 64 * 1024
    assert limit < 140 * 1024, "the cache log grew too large for this test's limit"
    before = cache_stats(cache).disk_errors
    soft, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (limit, hard))
    try:
        image = image_messages(seed=20, size=BIG_IMAGE)
        status, first = ask(stack, image)
        assert status == 200 and first
        eventually(
            lambda: cache_stats(cache).disk_errors > before,
            timeout=10,
            what="the failed disk write to be counted",
        )
        failed = events(stack, "cache", "disk_write_failed")
        assert failed and "File too large" in failed[-1]["error"], failed
        assert ask(stack, image) == (200, first)  # served from memory, same text
    finally:
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (soft, hard))
    assert cache_child.alive() and grpc_health(cache) == SERVING


# ---- 4. SIGTERM to each service under load ------------------------------------------------------
def terminate(stack: Stack, component: str) -> tuple[list[int], float]:
    """SIGTERM every replica of `component` (no wait); returns their pids and descendants
    and when the signal went out."""
    pids = []
    for child in stack.children[component]:
        assert child.pid is not None
        pids += [child.pid, *descendants(child.pid)]
        child.stopping = True  # a deliberate stop, not a crash
        child.signal(signal.SIGTERM)
    return pids, time.monotonic()


def closed(address: str) -> bool:
    """The server stopped accepting: its listener is closed (a draining gRPC server reports
    NOT_SERVING a moment before it stops taking calls; only this is "new calls are refused")."""
    return grpc_health(address) is None


def expect_clean_exit(stack: Stack, component: str, pids: list[int], since: float) -> None:
    """Each replica exited 0 within the grace period, and left no process behind."""
    for child in stack.children[component]:
        assert child.wait(max(0.0, since + GRACE - time.monotonic())), f"{child.name} hung"
        assert child.returncode() == 0, (child.name, child.returncode(), child.tail())
    assert not [p for p in pids if process_running(p)], "orphaned processes"


def restart_all(stack: Stack, component: str) -> None:
    """Start the stopped replicas again on their ports, all at once (loading in parallel)."""
    for child in stack.children[component]:
        if child.stopping and not child.wait(GRACE + 5):  # a failed test's hung replica
            child.signal(signal.SIGKILL)
            child.wait(5)
        if not child.alive():
            child.start()
    if component != "gateway":  # the gateway's /ready does not cover the cache
        for address in stack.addresses(component):  # type: ignore[arg-type]
            eventually(lambda a=address: grpc_health(a) == SERVING, 120, f"{address} back")
    eventually(lambda: ready(stack) == 200, timeout=120, what="/ready back to 200")


def test_sigterm_decoders_under_load(stack: Stack, references: list[str]) -> None:
    """Both decoder replicas get SIGTERM under ten open streams: they stop taking calls at
    once (a new request gets 503, no decoder is left), the ten streams run to their exact end
    within the grace period, and each decoder exits 0."""
    load = Load(stack.gateway_url, [body(text_messages(p)) for p in PROMPTS])
    try:
        load.wait_started()
        in_flight = not all(o.done for o in load.outcomes)  # at the signal, not after
        pids, since = terminate(stack, "decoder")
        for address in stack.addresses("decoder"):
            eventually(lambda a=address: closed(a), 5, "the decoders to stop accepting")
        status, error = ask(stack, text_messages("Anyone there?"))
        assert status == 503 and error["type"] == "server_error", error
        assert in_flight, "the streams were over before the signal"
        expect_completed(load.join(), references)
        expect_clean_exit(stack, "decoder", pids, since)
    finally:
        restart_all(stack, "decoder")


def test_sigterm_encoder_under_load(stack: Stack, references: list[str]) -> None:
    """Ten image requests are all inside the encoder (each looked its features up in the
    cache) when it gets SIGTERM: every one is encoded and answered in full, new image requests
    get 503, text requests still work."""
    images = [image_messages(seed=100 + i) for i in range(CLIENTS)]
    expected = [o.text for o in Load(stack.gateway_url, [body(m, 8) for m in images]).join()]
    assert all(expected)
    cache = stack.address("cache")
    reset_cache(cache)  # so the load below encodes every image again
    misses = cache_stats(cache, "features").misses
    load = Load(stack.gateway_url, [body(m, 8) for m in images])
    try:
        deadline = time.monotonic() + 60
        while cache_stats(cache, "features").misses < misses + CLIENTS:  # all ten inside
            assert time.monotonic() < deadline, "the image requests never reached the encoder"
            time.sleep(0.005)
        pids, since = terminate(stack, "encoder")
        eventually(lambda: closed(stack.address("encoder")), 5, "the encoder to stop accepting")
        status, error = ask(stack, image_messages(seed=999))
        assert status == 503 and error["type"] == "server_error", error
        assert ask(stack, text_messages(PROMPTS[1]), STREAM_TOKENS) == (200, references[1])
        outcomes = load.join()
        assert [completed(o) for o in outcomes] == [(t, "length", None, True, "") for t in expected]
        expect_clean_exit(stack, "encoder", pids, since)
    finally:
        restart_all(stack, "encoder")
    # Proof that work was in flight: images finished encoding after the drain began.
    records = log_records(stack, "encoder")
    drained = max(i for i, r in enumerate(records) if r.get("event") == "draining")
    assert any(r.get("event") == "encoded" for r in records[drained:]), "nothing was in flight"


def test_sigterm_cache_under_load(stack: Stack, references: list[str]) -> None:
    """The cache gets SIGTERM under ten open text streams: they finish exactly, a new image
    request gets 503 (its features need the cache), a new text request is answered exactly,
    the cache exits 0 (its queued disk writes flushed), and images work once it is back."""
    load = Load(stack.gateway_url, [body(text_messages(p)) for p in PROMPTS])
    try:
        load.wait_started()
        in_flight = not all(o.done for o in load.outcomes)  # at the signal, not after
        pids, since = terminate(stack, "cache")
        eventually(lambda: closed(stack.address("cache")), 5, "the cache to stop accepting")
        status, error = ask(stack, image_messages(seed=30))
        assert status == 503 and error["type"] == "server_error", error
        assert in_flight, "the streams were over before the signal"
        assert ask(stack, text_messages(PROMPTS[2]), STREAM_TOKENS) == (200, references[2])
        expect_completed(load.join(), references)
        expect_clean_exit(stack, "cache", pids, since)
    finally:
        restart_all(stack, "cache")
    eventually(lambda: ask(stack, image_messages(seed=30))[0] == 200, 30, "images back")


def test_sigterm_gateway_under_load(stack: Stack, references: list[str]) -> None:
    """The gateway drains: /ready and new requests get 503 (`shutting_down`) at once, while
    the ten open streams run to their end; then it exits 0."""
    load = Load(stack.gateway_url, [body(text_messages(p)) for p in PROMPTS])
    try:
        load.wait_started()
        in_flight = not all(o.done for o in load.outcomes)  # at the signal, not after
        pids, since = terminate(stack, "gateway")
        eventually(lambda: ready(stack) == 503, 5, "the gateway's /ready to turn 503")
        status, error = ask(stack, text_messages("Anyone there?"))
        assert status == 503 and error["code"] == "shutting_down", error
        assert in_flight, "the streams were over before the signal"
        assert http_code(stack.gateway_url + "/health")[0] == 200  # alive while draining
        expect_completed(load.join(), references)
        expect_clean_exit(stack, "gateway", pids, since)
    finally:
        restart_all(stack, "gateway")
    drained = events(stack, "gateway", "drained")
    assert drained and drained[-1]["in_flight"] == 0 and drained[-1]["refused"] >= 2, drained


# ---- 5. the launcher (`make run-local`) under load ----------------------------------------------
def test_launcher_sigterm_under_load(
    checkpoint_factory: Any, tmp_path: Path, references: list[str]
) -> None:
    """`python -m services.launcher` (what `make run-local` runs) on the tiny checkpoint: with
    ten streams open, SIGTERM (docker stop, systemd) lets them finish exactly, exits 0, and
    leaves none of its processes behind. Ctrl-C takes the same path (the launcher maps SIGTERM
    onto SIGINT's handler); tests/test_e2e_launcher.py sends SIGINT to the demo stack."""
    port = free_port()
    argv = [sys.executable, "-m", "services.launcher", "--model"]
    argv += [str(checkpoint_factory("qwen2_5_vl", "hf")), "--served-model-name", MODEL_ID]
    argv += ["--gateway-port", str(port), "--log-dir", str(tmp_path / "logs")]
    argv += ["--grace", str(GRACE), "--startup-timeout", "240"]
    launcher = subprocess.Popen(
        argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(launcher.stdout), daemon=True)  # type: ignore[arg-type]
    reader.start()
    url = f"http://127.0.0.1:{port}"
    try:
        eventually(
            lambda: any("Press Ctrl-C" in line for line in output) or launcher.poll() is not None,
            timeout=240,
            what="the launcher's summary",
        )
        assert launcher.poll() is None, "".join(output)
        pids = [int(p) for p in re.findall(r"pid (\d+)", "".join(output))]
        assert len(pids) == 4  # cache, encoder, decoder, gateway
        pids += [d for p in pids for d in descendants(p)]
        assert http_code(url + "/ready")[0] == 200
        load = Load(url, [body(text_messages(p)) for p in PROMPTS])
        load.wait_started()
        launcher.send_signal(signal.SIGTERM)
        expect_completed(load.join(), references)
        assert launcher.wait(timeout=GRACE + 30) == 0, "".join(output)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    reader.join(timeout=5)
    assert not [p for p in pids if process_running(p)], "orphaned service processes"
    assert "stopping" in "".join(output)
