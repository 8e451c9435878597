"""Hostile input against the gateway (issue #9), with fake backends: floods of invalid requests,
SSRF, endless / lying / slow bodies both ways, image bombs and disguises, local path escapes and
API keys on every route.

No packet leaves the machine, even if the SSRF guard breaks: the fetcher's network backend is a
virtual network (`VirtualNetwork`) in which every address but the fake public hosts is played
by a loopback canary, names resolve through a fake DNS, and a process-wide tripwire refuses any
Python socket connecting beyond loopback. A broken guard shows up as hits on the canary.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import gzip
import http.server
import io
import ipaddress
import json
import random
import re
import select
import socket
import struct
import threading
import time
import tracemalloc
import urllib.parse
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpcore
import httpx
import pytest
from PIL import Image, ImageFile
from starlette.routing import Route

from services.gateway import ssrf
from services.gateway.config import config_from_args
from services.gateway.fetch import GuardedBackend, MediaFetcher
from services.gateway.testing import (
    CanaryServer,
    FakeDecoder,
    FakeEncoder,
    FakeServer,
    FakeStack,
    model_info,
)

KiB, MiB = 1024, 1024 * 1024
PUBLIC_IP = "93.184.216.34"  # the fake internet's one host (example.com's address)
PUBLIC_HOST = "images.example.test"  # resolves to PUBLIC_IP in the fake DNS
ENDLESS_CAP = 64 * MiB  # what an "endless" sender gives up after, so a broken cap cannot hang
KEY = "sk-Hostile-Test-Key"


# ---------------------------------------------------------------------------------------------
# The network: tripwire, fake DNS, virtual network, upstream server, canary
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def loopback_only() -> Iterator[list[Any]]:
    """Any Python socket connecting beyond loopback (or by name) fails before a packet leaves."""
    attempts: list[Any] = []
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def check(sock: socket.socket, address: Any) -> None:
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return
        try:
            ok = ipaddress.ip_address(str(address[0]).split("%", 1)[0]).is_loopback
        except ValueError:  # a host name: the OS would resolve it, so refuse
            ok = False
        if not ok:
            attempts.append(address)
            raise OSError(errno.ENETUNREACH, f"test tripwire: connect to {address!r} refused")

    def connect(sock: socket.socket, address: Any) -> None:
        check(sock, address)
        real_connect(sock, address)

    def connect_ex(sock: socket.socket, address: Any) -> int:
        check(sock, address)
        return real_connect_ex(sock, address)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", connect)
        mp.setattr(socket.socket, "connect_ex", connect_ex)
        yield attempts
    assert attempts == [], f"something tried to leave the machine: {attempts}"


class FakeDNS:
    """Stands in for `ssrf.resolve`: each name has a list of answers, given out in turn (the
    last one repeats); any other name does not exist."""

    def __init__(self) -> None:
        self.answers: dict[str, list[list[str]]] = {
            PUBLIC_HOST: [[PUBLIC_IP]],
            "localhost": [["127.0.0.1"]],
            "metadata.google.internal": [["169.254.169.254"]],
        }
        self.queries: list[str] = []

    def __call__(self, host: str, port: int = 0) -> list[ssrf.IPAddress]:
        self.queries.append(host)
        turns = self.answers.get(host.lower())
        if turns is None:
            raise OSError(f"fake DNS: {host} does not exist")
        answer = turns.pop(0) if len(turns) > 1 else turns[0]
        return [ipaddress.ip_address(a) for a in answer]


class VirtualNetwork(httpcore.AsyncNetworkBackend):
    """The fetcher's only way out. `public` maps fake public addresses to loopback ports; every
    other address is the inside network, played by the canary. Names are resolved through the
    (fake) DNS here, as the OS would if a broken guard connected by name."""

    def __init__(self, public: dict[str, int], canary_port: int) -> None:
        self.public, self.canary_port = public, canary_port
        self.real = httpcore.AnyIOBackend()
        self.connects: list[str] = []

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.AsyncNetworkStream:
        self.connects.append(host)
        ip = ssrf.parse_numeric_host(host) or ssrf.resolve(host, port)[0]
        target = self.public.get(str(ip), self.canary_port)
        return await self.real.connect_tcp(
            "127.0.0.1", target, timeout=timeout, socket_options=socket_options
        )

    async def sleep(self, seconds: float) -> None:
        await self.real.sleep(seconds)


def png_bytes(size: tuple[int, int] = (8, 8), noisy: bool = False, **save: Any) -> bytes:
    w, h = size
    if noisy:
        im = Image.frombytes("RGB", size, random.Random(w * h).randbytes(w * h * 3))
    else:
        im = Image.new("RGB", size, (10, 200, 30))
    buf = io.BytesIO()
    im.save(buf, format="PNG", **save)
    return buf.getvalue()


def jpeg_bytes(size: tuple[int, int] = (64, 48), **save: Any) -> bytes:
    w, h = size
    im = Image.frombytes("RGB", size, random.Random(w + h).randbytes(w * h * 3))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", **save)
    return buf.getvalue()


class Upstream:
    """A hostile media host on loopback (reached as PUBLIC_IP through the virtual network).

    /<file>: a file, served as image/png whatever it is; /redirect?to=URL: a 302;
    /endless/{eof,chunked,length}: bytes without end (length: a Content-Length of 10^12);
    /lying-short: Content-Length 64, then bytes without end; /lying-long/{stall,close}:
    Content-Length 100000, 100 bytes, then silence or a close; /drip: a byte every 50 ms;
    /silent: never answers; /gzip-bomb: 64 MiB of zeros as a gzip Content-Encoding.
    `sent` counts the body bytes each path managed to write.
    """

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files, self.hits, self.sent = files, [], {}
        self.stopping = threading.Event()
        self.bomb = gzip.compress(b"\0" * (64 * MiB), compresslevel=9)
        upstream = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                upstream.hits.append(self.path)
                with contextlib.suppress(OSError):
                    upstream.serve(self)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def head(self, h: http.server.BaseHTTPRequestHandler, status: int, **headers: str) -> None:
        h.send_response(status)
        h.send_header("Connection", "close")
        for name, value in headers.items():
            h.send_header(name.replace("_", "-"), value)
        h.end_headers()

    def gone(self, h: http.server.BaseHTTPRequestHandler, limit: float) -> None:
        """Wait until the client hangs up (or `limit` seconds, or the server stops)."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline and not self.stopping.is_set():
            readable, _, _ = select.select([h.connection], [], [], 0.05)
            if readable and not h.connection.recv(1, socket.MSG_PEEK):
                return

    def stream(self, h: http.server.BaseHTTPRequestHandler, key: str, chunked: bool) -> None:
        block = b"\x89PNG" + b"\xab" * (64 * KiB - 4)
        self.sent[key] = 0
        while self.sent[key] < ENDLESS_CAP and not self.stopping.is_set():
            h.wfile.write(b"%x\r\n%s\r\n" % (len(block), block) if chunked else block)
            self.sent[key] += len(block)

    def serve(self, h: http.server.BaseHTTPRequestHandler) -> None:
        path, _, query = h.path.partition("?")
        name = path.strip("/")
        if path == "/redirect":
            self.head(h, 302, Location=urllib.parse.parse_qs(query)["to"][0], Content_Length="0")
        elif name in self.files:
            body = self.files[name]
            self.head(h, 200, Content_Type="image/png", Content_Length=str(len(body)))
            h.wfile.write(body)
        elif path.startswith("/endless/"):
            mode = path.rsplit("/", 1)[1]
            extra = {"eof": {}, "chunked": {"Transfer_Encoding": "chunked"}}
            self.head(h, 200, **extra.get(mode, {"Content_Length": str(10**12)}))
            self.stream(h, path, chunked=mode == "chunked")
        elif path == "/lying-short":
            self.head(h, 200, Content_Length="64")
            self.stream(h, path, chunked=False)
        elif path.startswith("/lying-long/"):
            self.head(h, 200, Content_Length="100000")
            h.wfile.write(b"\x89PNG\r\n\x1a\n" + b"\0" * 92)
            if path.endswith("stall"):
                self.gone(h, 10.0)
        elif path == "/drip":
            self.head(h, 200, Content_Length="100000")
            deadline = time.monotonic() + 10.0
            while time.monotonic() < deadline and not self.stopping.is_set():
                h.wfile.write(b"\0")
                time.sleep(0.05)
        elif path == "/silent":
            self.gone(h, 10.0)
        elif path == "/gzip-bomb":
            self.head(h, 200, Content_Encoding="gzip", Content_Length=str(len(self.bomb)))
            h.wfile.write(self.bomb)
        else:
            self.head(h, 404, Content_Length="0")

    def stop(self) -> None:
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()


SECRET = png_bytes((4, 4))


@pytest.fixture(scope="module")
def dns() -> Iterator[FakeDNS]:
    fake = FakeDNS()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ssrf, "resolve", fake)
        yield fake


@pytest.fixture(scope="module")
def canary_server() -> Iterator[CanaryServer]:
    server = CanaryServer({"secret.png": SECRET, "latest/meta-data/": b"iam"})
    yield server
    server.stop()


@pytest.fixture
def canary(canary_server: CanaryServer) -> Iterator[CanaryServer]:
    """The inside network; every test starts with no hits and must end with none."""
    canary_server.hits.clear()
    yield canary_server
    assert canary_server.hits == [], "a private address was reached"


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    files = {
        "cat.png": png_bytes(),
        "fits.png": b"SIMPLE  =                    T".ljust(2880, b" "),
        "svg.png": b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>',
        "psd.png": b"8BPS\x00\x01" + b"\x00" * 40,
    }
    server = Upstream(files)
    yield server
    server.stop()


def make_stack(upstream: Upstream, canary: CanaryServer, **config: Any) -> FakeStack:
    models = [model_info("vl", ("text", "image")), model_info("txt", ("text",))]
    stack = FakeStack(
        [FakeServer(FakeEncoder([models[0]]))],
        [FakeServer(FakeDecoder("d0", models))],
        **config,
    )
    stack.net = VirtualNetwork({PUBLIC_IP: upstream.port}, canary.port)  # type: ignore[attr-defined]
    stack.app.state.fetcher.backend.inner = stack.net
    return stack


@pytest.fixture(scope="module")
def media_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hostile-media")
    for sub in ("allowed/sub", "allowed-evil", "outside"):
        (root / sub).mkdir(parents=True)
    for path in ("allowed/ok.png", "allowed-evil/x.png", "outside/secret.png", "secret.png"):
        (root / path).write_bytes(png_bytes())
    (root / "allowed" / "linkdir").symlink_to(root / "outside", target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def stack(
    upstream: Upstream, canary_server: CanaryServer, dns: FakeDNS, media_root: Path
) -> Iterator[FakeStack]:
    """Roomy limits (images up to 6 MiB, bodies up to 10 MiB), the SSRF policy on."""
    s = make_stack(
        upstream,
        canary_server,
        allowed_local_media_path=str(media_root / "allowed"),
        max_image_bytes=6 * MiB,
        max_body_bytes=10 * MiB,
    )
    yield s
    s.stop()


TIGHT_BYTES = 256 * KiB


@pytest.fixture(scope="module")
def tight(upstream: Upstream, canary_server: CanaryServer, dns: FakeDNS) -> Iterator[FakeStack]:
    """Small caps and short clocks: 256 KiB bodies and images, 1 s to send a body, 0.5 s
    connect/read timeout per fetch (1.5 s for a whole fetch)."""
    s = make_stack(
        upstream,
        canary_server,
        max_image_bytes=TIGHT_BYTES,
        max_body_bytes=TIGHT_BYTES,
        body_timeout=1.0,
        fetch_timeout=0.5,
    )
    yield s
    s.stop()


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def assert_error(r: httpx.Response, status: int, needle: str = "") -> dict[str, Any]:
    """A 4xx/5xx in OpenAI's error shape."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
    assert needle.lower() in err["message"].lower(), err["message"]
    return err


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def image_chat(stack: FakeStack, url: str, timeout: float = 30) -> httpx.Response:
    content = [{"type": "text", "text": "see"}, {"type": "image_url", "image_url": {"url": url}}]
    body = {"model": "vl", "messages": [{"role": "user", "content": content}], "max_tokens": 4}
    return httpx.post(stack.url + "/v1/chat/completions", json=body, timeout=timeout)


VALID = {"model": "txt", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}


def assert_serving(stack: FakeStack) -> None:
    assert httpx.get(stack.url + "/health", timeout=10).status_code == 200
    r = httpx.post(stack.url + "/v1/chat/completions", json=VALID, timeout=30)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"], r.text


def error_counts(stack: FakeStack) -> dict[str, float]:
    text = httpx.get(stack.url + "/metrics", timeout=10).text
    found = re.findall(r'^prism:request_errors_total\{kind="(\w+)"\} (\S+)$', text, re.M)
    return {kind: float(n) for kind, n in found}


def wait_until(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


@contextlib.contextmanager
def traced_peak() -> Iterator[list[int]]:
    """Peak bytes Python allocated (every thread: the gateway runs in this process) above the
    level at entry; read the list after the block."""
    out = [0]
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        yield out
        out[0] = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def crafted_png(width: int, height: int, before: bytes = b"", after: bytes = b"") -> bytes:
    """A PNG whose header claims width x height RGB pixels, with a tiny IDAT (never decoded),
    `before` and `after` extra chunks around it. Nothing of width x height is allocated."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + before
        + idat
        + after
        + png_chunk(b"IEND", b"")
    )


def jpeg_with_size(width: int, height: int) -> bytes:
    """A real JPEG whose SOF0 header is rewritten to claim width x height."""
    data = bytearray(jpeg_bytes((16, 16)))
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


# ---------------------------------------------------------------------------------------------
# 100 invalid requests, then a valid one; 50 concurrent ones leave /health 200
# ---------------------------------------------------------------------------------------------

CHAT = "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]


def chat_body(**fields: Any) -> bytes:
    return json.dumps({"model": "txt", "messages": MSG, **fields}).encode()


# (path, raw body, expected status, param or None when not checked)
INVALID: list[tuple[str, bytes, int, str | None]] = [
    (CHAT, chat_body(temperature=-0.5), 400, "temperature"),
    (CHAT, chat_body(temperature=2.01), 400, "temperature"),
    (CHAT, chat_body(temperature="hot"), 400, "temperature"),
    (CHAT, chat_body(temperature=[1]), 400, "temperature"),
    (CHAT, chat_body()[:-1] + b', "temperature": NaN}', 400, "temperature"),
    (CHAT, chat_body()[:-1] + b', "temperature": 1e999}', 400, "temperature"),
    (CHAT, chat_body(top_p=0), 400, "top_p"),
    (CHAT, chat_body(top_p=-0.1), 400, "top_p"),
    (CHAT, chat_body(top_p=1.0001), 400, "top_p"),
    (CHAT, chat_body(top_p="all"), 400, "top_p"),
    (CHAT, chat_body(max_tokens=0), 400, "max_tokens"),
    (CHAT, chat_body(max_tokens=-1), 400, "max_tokens"),
    (CHAT, chat_body(max_tokens=1.5), 400, "max_tokens"),
    (CHAT, chat_body(max_tokens="ten"), 400, "max_tokens"),
    (CHAT, chat_body(max_tokens=2**40), 400, None),
    (CHAT, chat_body(max_completion_tokens=-3), 400, "max_completion_tokens"),
    (CHAT, chat_body(messages=[]), 400, "messages"),
    (CHAT, chat_body(messages="hi"), 400, "messages"),
    (CHAT, chat_body(messages=None), 400, "messages"),
    (CHAT, chat_body(messages=[{"content": "no role"}]), 400, None),
    (CHAT, chat_body(messages=[{"role": None, "content": "x"}]), 400, None),
    (CHAT, chat_body(messages=[{"role": "wizard", "content": "x"}]), 400, None),
    (CHAT, chat_body(messages=[{"role": "user", "content": {"a": 1}}]), 400, None),
    (CHAT, json.dumps({"model": "nope", "messages": MSG}).encode(), 404, "model"),
    (CHAT, json.dumps({"model": "", "messages": MSG}).encode(), 400, "model"),
    (CHAT, json.dumps({"model": 5, "messages": MSG}).encode(), 400, "model"),
    (CHAT, json.dumps({"messages": MSG}).encode(), 400, "model"),
    (CHAT, b"", 400, None),
    (CHAT, b"{not json", 400, None),
    (CHAT, b"\xff\xfe{}", 400, None),
    (CHAT, b"[1, 2]", 400, None),
    (CHAT, b"[" * 100_000 + b"]" * 100_000, 400, None),  # nested too deeply for any parser
    (CHAT, b'{"model": "txt", "x": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5001, 400, None),
    (CHAT, b'{"model": "txt", "pad": "' + b"x" * (10 * MiB) + b'"}', 413, None),
    ("/v1/responses", json.dumps({"model": "txt", "input": 5}).encode(), 400, None),
    ("/v1/responses", json.dumps({"model": "nope", "input": "x"}).encode(), 404, "model"),
    ("/v1/responses", json.dumps({"model": "txt", "input": "x", "top_p": 2}).encode(), 400, None),
    ("/v1/responses", json.dumps({"input": "x"}).encode(), 400, "model"),
]


def test_hundred_invalid_requests_then_a_valid_one(stack: FakeStack) -> None:
    before = error_counts(stack)
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        for i in range(100):
            path, raw, status, param = INVALID[i % len(INVALID)]
            r = client.post(path, content=raw, headers={"content-type": "application/json"})
            err = assert_error(r, status)
            assert err["type"] == "invalid_request_error", (i, err)
            if param is not None:
                assert err["param"] == param, (i, err)
        r = client.post(CHAT, json=VALID)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == "Hello from d0"
    after = error_counts(stack)
    assert after.get("internal", 0) == before.get("internal", 0)  # not one was a 500
    errors = sum(after.values()) - sum(before.values())
    assert errors == 100


def test_fifty_concurrent_invalid_requests_leave_health_200(stack: FakeStack) -> None:
    stop, health = threading.Event(), []

    def poll_health() -> None:  # /health answers all the way through the flood
        with httpx.Client(base_url=stack.url, timeout=10) as client:
            while not stop.is_set():
                health.append(client.get("/health").status_code)
                stop.wait(0.02)

    async def flood() -> list[int]:
        # One event loop, 50 connections at once (50 client threads would mostly measure the
        # GIL this process shares with the gateway).
        limits = httpx.Limits(max_connections=50)
        async with httpx.AsyncClient(base_url=stack.url, timeout=60, limits=limits) as client:

            async def invalid(i: int) -> int:
                path, raw, _, _ = INVALID[(7 * i) % len(INVALID)]
                headers = {"content-type": "application/json"}
                return (await client.post(path, content=raw, headers=headers)).status_code

            return list(await asyncio.gather(*(invalid(i) for i in range(50))))

    poller = threading.Thread(target=poll_health, daemon=True)
    poller.start()
    try:
        codes = asyncio.run(flood())
    finally:
        stop.set()
        poller.join(timeout=15)
    assert all(400 <= c < 500 for c in codes), codes
    assert health and set(health) == {200}, health
    assert_serving(stack)


# ---------------------------------------------------------------------------------------------
# SSRF: nothing inside is ever reached (the canary counts)
# ---------------------------------------------------------------------------------------------

INSIDE = [
    "http://127.0.0.1:{port}/secret.png",
    "http://169.254.169.254/latest/meta-data/",
    "http://[::ffff:169.254.169.254]:{port}/latest/meta-data/",
    "http://2130706433:{port}/secret.png",
    "http://10.0.0.1/secret.png",
    "http://localhost:{port}/secret.png",
    "http://metadata.google.internal/latest/meta-data/",
]


@pytest.mark.parametrize("template", INSIDE)
def test_ssrf_inside_addresses_refused(
    stack: FakeStack, canary: CanaryServer, template: str
) -> None:
    before = len(stack.net.connects)
    assert_error(image_chat(stack, template.format(port=canary.port)), 400, "refusing")
    assert stack.net.connects[before:] == []  # refused before any connect


@pytest.mark.parametrize("template", INSIDE)
def test_ssrf_redirect_from_allowed_host_to_inside_refused(
    stack: FakeStack, upstream: Upstream, canary: CanaryServer, template: str
) -> None:
    target = template.format(port=canary.port)
    url = f"http://{PUBLIC_HOST}/redirect?" + urllib.parse.urlencode({"to": target})
    hits = len(upstream.hits)
    assert_error(image_chat(stack, url), 400, "refusing")
    assert [h.split("?")[0] for h in upstream.hits[hits:]] == ["/redirect"]  # one hop, no more


def test_ssrf_dns_rebinding_checked_at_connect(
    stack: FakeStack, upstream: Upstream, canary: CanaryServer, dns: FakeDNS
) -> None:
    """A name that resolves public, then private: the address checked is the one connected to
    (one lookup per connection), so the first fetch reaches the public host and the next one,
    on a new connection, is refused."""
    name = "rebind.example.test"
    dns.answers[name] = [[PUBLIC_IP], ["10.0.0.1"]]
    queries = len(dns.queries)
    assert image_chat(stack, f"http://{name}/cat.png").status_code == 200
    assert dns.queries[queries:] == [name]  # resolved once, at connect, then connected by IP
    assert_error(image_chat(stack, f"http://{name}/cat.png"), 400, "10.0.0.1")
    assert dns.queries[queries:] == [name, name]


def test_a_broken_guard_would_be_caught(canary: CanaryServer) -> None:
    """The harness itself: with the policy opened up (allow everything), the same fetch reaches
    the canary through the virtual network, so the tests above can fail."""

    async def run() -> bytes:
        everything = ssrf.parse_allow_list(["0.0.0.0/0", "::/0"])
        net = VirtualNetwork({}, canary.port)
        fetcher = MediaFetcher(timeout=5, backend=GuardedBackend(everything, inner=net))
        try:
            return await fetcher.fetch("http://10.0.0.1/secret.png", MiB)
        finally:
            await fetcher.aclose()

    assert asyncio.run(run()) == SECRET
    assert canary.hits == ["/secret.png"]
    canary.hits.clear()


# ---------------------------------------------------------------------------------------------
# Endless, lying and slow bodies: the request body to the gateway
# ---------------------------------------------------------------------------------------------


def raw_response(sock: socket.socket, timeout: float) -> tuple[int, bytes]:
    """Read one HTTP response (status, body) from a raw socket, or (0, b"") if none came."""
    buf, deadline = b"", time.monotonic() + timeout
    sock.settimeout(0.1)
    while time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            break
        if not data:
            break
        buf += data
        head, sep, body = buf.partition(b"\r\n\r\n")
        length = re.search(rb"(?im)^content-length: *(\d+)", head)
        if sep and length and len(body) >= int(length.group(1)):
            return int(head.split()[1]), body[: int(length.group(1))]
    if not buf:
        return 0, b""
    return int(buf.split()[1]), buf.partition(b"\r\n\r\n")[2]


def closed_by_server(sock: socket.socket, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    sock.settimeout(0.1)
    while time.monotonic() < deadline:
        try:
            if not sock.recv(65536):
                return True
        except TimeoutError:
            continue
        except OSError:
            return True
    return False


def request_head(stack: FakeStack, *headers: str) -> bytes:
    lines = ["POST /v1/chat/completions HTTP/1.1", f"Host: 127.0.0.1:{stack.gateway.port}"]
    lines += ["Content-Type: application/json", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_endless_request_body_cut_at_the_cap(tight: FakeStack) -> None:
    sock = socket.create_connection(("127.0.0.1", tight.gateway.port))
    sent, done = [0], threading.Event()

    def send_forever() -> None:
        block = b"%x\r\n%s\r\n" % (64 * KiB, b"x" * (64 * KiB))
        with contextlib.suppress(OSError):
            sock.sendall(request_head(tight, "Transfer-Encoding: chunked"))
            while sent[0] < ENDLESS_CAP and not done.is_set():
                sock.sendall(block)
                sent[0] += 64 * KiB

    sender = threading.Thread(target=send_forever, daemon=True)
    with traced_peak() as peak:
        sender.start()
        status, body = raw_response(sock, timeout=30)
    done.set()
    sock.close()
    sender.join(timeout=10)
    assert status == 413, body
    assert json.loads(body)["error"]["code"] == "payload_too_large"
    # Read up to the cap, drained a few caps more, then hung up: never the whole stream.
    assert sent[0] < ENDLESS_CAP // 2, sent[0]
    assert peak[0] < 16 * TIGHT_BYTES, f"peak {peak[0]} bytes for a {TIGHT_BYTES}-byte cap"
    assert_serving(tight)


@pytest.mark.parametrize("drip", [False, True], ids=["stalls", "drips"])
def test_body_shorter_than_content_length_times_out(tight: FakeStack, drip: bool) -> None:
    """Content-Length 1000, then 20 bytes and silence, or a byte every 50 ms: 408 once the
    body deadline (1 s) passes (uvicorn closes the connection at its keep-alive timeout)."""
    sock = socket.create_connection(("127.0.0.1", tight.gateway.port))
    stop = threading.Event()

    def drip_bytes() -> None:
        with contextlib.suppress(OSError):
            while not stop.wait(0.05):
                sock.sendall(b" ")

    started = time.monotonic()
    sock.sendall(request_head(tight, "Content-Length: 1000") + b'{"model": "txt", "me')
    dripper = threading.Thread(target=drip_bytes, daemon=True)
    if drip:
        dripper.start()
    status, body = raw_response(sock, timeout=15)
    elapsed = time.monotonic() - started
    stop.set()
    assert status == 408, body
    assert json.loads(body)["error"]["code"] == "request_timeout"
    assert 0.9 < elapsed < 8, elapsed
    sock.close()
    assert_serving(tight)


def test_client_hanging_up_mid_body_is_not_a_server_error(tight: FakeStack) -> None:
    before = error_counts(tight)
    sock = socket.create_connection(("127.0.0.1", tight.gateway.port))
    sock.sendall(request_head(tight, "Content-Length: 1000") + b'{"model": "txt"')
    sock.shutdown(socket.SHUT_WR)
    assert closed_by_server(sock, timeout=10)
    sock.close()
    # The access log line (and its metric) may come just after the close: poll.
    gone = "client_disconnected"
    wait_until(lambda: error_counts(tight).get(gone, 0) > before.get(gone, 0), 10)
    assert error_counts(tight).get("internal", 0) == before.get("internal", 0)


def test_content_length_shorter_than_body(tight: FakeStack) -> None:
    """Only the declared bytes are the body: a JSON document cut there is a 400."""
    raw = json.dumps(VALID).encode()
    sock = socket.create_connection(("127.0.0.1", tight.gateway.port))
    sock.sendall(request_head(tight, "Content-Length: 20", "Connection: close") + raw)
    status, body = raw_response(sock, timeout=10)
    sock.close()
    assert status == 400 and "not valid JSON" in json.loads(body)["error"]["message"], body


def test_body_timeout_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PRISM_BODY_TIMEOUT", raising=False)
    assert config_from_args([]).body_timeout == 60.0
    assert config_from_args(["--body-timeout", "7"]).body_timeout == 7.0
    monkeypatch.setenv("PRISM_BODY_TIMEOUT", "3")
    assert config_from_args([]).body_timeout == 3.0


def test_absurd_content_length_refused_up_front(tight: FakeStack) -> None:
    sock = socket.create_connection(("127.0.0.1", tight.gateway.port))
    sock.sendall(request_head(tight, f"Content-Length: {10**15}", "Expect: 100-continue"))
    status, body = raw_response(sock, timeout=10)
    sock.close()
    assert status == 413, body


# ---------------------------------------------------------------------------------------------
# Endless, lying and slow bodies: media fetched from an upstream
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, needle",
    [
        ("/endless/eof", "limit"),
        ("/endless/chunked", "limit"),
        ("/endless/length", "limit"),  # refused from the header, before reading
        ("/lying-short", "image"),  # only the declared 64 bytes are read: not an image
        ("/gzip-bomb", "format"),  # never inflated: the raw bytes are no image
    ],
)
def test_endless_upstream_body_cut_at_the_cap(
    tight: FakeStack, upstream: Upstream, canary: CanaryServer, path: str, needle: str
) -> None:
    started = time.monotonic()
    with traced_peak() as peak:
        r = image_chat(tight, f"http://{PUBLIC_HOST}{path}")
    assert_error(r, 400, needle)
    assert time.monotonic() - started < 10
    assert peak[0] < 16 * TIGHT_BYTES, f"peak {peak[0]} bytes for a {TIGHT_BYTES}-byte cap"
    if path in upstream.sent:  # the upstream was cut off long before its own cap
        deadline = time.monotonic() + 10
        while upstream.sent[path] < ENDLESS_CAP and time.monotonic() < deadline:
            before = upstream.sent[path]
            time.sleep(0.2)
            if upstream.sent[path] == before:  # stopped: the gateway hung up
                break
        assert upstream.sent[path] < ENDLESS_CAP // 2, upstream.sent[path]


@pytest.mark.parametrize(
    "path, needle, at_least",
    [
        ("/silent", "timed out", 0.4),  # no headers: the 0.5 s read timeout
        ("/lying-long/stall", "timed out", 0.4),  # 100 of 100000 bytes, then nothing
        ("/lying-long/close", "failed", 0.0),  # 100 of 100000 bytes, then a close
        ("/drip", "timed out", 1.4),  # a byte every 50 ms: the whole-fetch limit (1.5 s)
    ],
)
def test_slow_or_lying_upstream_cut_at_the_time_limit(
    tight: FakeStack, canary: CanaryServer, path: str, needle: str, at_least: float
) -> None:
    started = time.monotonic()
    assert_error(image_chat(tight, f"http://{PUBLIC_HOST}{path}"), 400, needle)
    assert at_least <= time.monotonic() - started < 8


# ---------------------------------------------------------------------------------------------
# Image bombs and disguises: 4xx before a pixel is decoded
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Records any pixel decoding (ImageFile.load) in this process, where the gateway runs:
    the gateway judges images from their bytes and headers only."""
    loads: list[Any] = []
    real = ImageFile.ImageFile.load

    def load(im: ImageFile.ImageFile) -> Any:
        loads.append(im)
        return real(im)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    yield
    assert loads == [], "the gateway decoded pixels"


@pytest.fixture
def nothing_encoded(stack: FakeStack) -> Iterator[None]:
    """A refused image never reaches the encoder (which would decode it)."""
    encoder = stack.encoders[0].servicer
    calls = len(encoder.calls)
    yield
    assert len(encoder.calls) == calls, "a refused image reached the encoder"


def text_chunk(kind: bytes, size: int) -> bytes:
    if kind == b"tEXt":
        return png_chunk(kind, b"Comment\0" + b"a" * size)
    packed = zlib.compress(b"a" * size, 9)
    if kind == b"zTXt":
        return png_chunk(kind, b"Comment\0\0" + packed)
    return png_chunk(kind, b"Comment\0\x01\x00en\0\0" + packed)  # iTXt, compressed


MB_TEXT = 1024 * KiB + 1  # one byte over PIL's per-chunk text limit
BOMBS = {
    "50k x 50k PNG": crafted_png(50_000, 50_000),
    "50k x 50k JPEG": jpeg_with_size(50_000, 50_000),
    "8000 x 8000 PNG (under PIL's own bomb limit)": crafted_png(8000, 8000),
    "huge tEXt chunk": crafted_png(8, 8, before=text_chunk(b"tEXt", 3 * MiB)),
    "zTXt bomb before IDAT": crafted_png(8, 8, before=text_chunk(b"zTXt", 64 * MiB)),
    "zTXt bomb after IDAT": crafted_png(8, 8, after=text_chunk(b"zTXt", 64 * MiB)),
    "iTXt bomb after IDAT": crafted_png(8, 8, after=text_chunk(b"iTXt", MB_TEXT)),
    "tEXt just over the limit after IDAT": crafted_png(8, 8, after=text_chunk(b"tEXt", MB_TEXT)),
    "many text chunks": crafted_png(8, 8, after=text_chunk(b"tEXt", 900 * KiB) * 5),
    "chunk length past the end": crafted_png(8, 8)[:33] + b"\x7f\xff\xff\xf0tEXtabc",
    "truncated PNG": png_bytes((64, 64), noisy=True)[:5000],
    "truncated JPEG": jpeg_bytes()[:-600],
    "JPEG without its end marker": jpeg_bytes()[:-2],
    "progressive JPEG, truncated": jpeg_bytes(progressive=True)[:-500],
    "FITS disguised as PNG": b"SIMPLE  =                    T".ljust(2880, b" "),
    "SVG disguised as PNG": b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>',
    "PSD disguised as PNG": b"8BPS\x00\x01" + b"\x00" * 40,
    "PNG signature, PSD body": b"\x89PNG\r\n\x1a\n8BPS\x00\x01" + b"\x00" * 40,
    "empty": b"",
}


@pytest.mark.parametrize("name", list(BOMBS))
def test_image_bombs_and_disguises_refused_before_decoding(
    stack: FakeStack, no_decoding: None, nothing_encoded: None, name: str
) -> None:
    started = time.monotonic()
    assert_error(image_chat(stack, data_uri(BOMBS[name])), 400)
    assert time.monotonic() - started < 5


def test_pixel_cap_holds_without_pils_own_guard(
    stack: FakeStack, no_decoding: None, nothing_encoded: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # someone turned PIL's check off
    assert_error(image_chat(stack, data_uri(crafted_png(50_000, 50_000))), 400, "pixels")


@pytest.mark.parametrize("name", ["fits.png", "svg.png", "psd.png"])
def test_disguised_images_fetched_as_png_refused(
    stack: FakeStack, no_decoding: None, nothing_encoded: None, canary: CanaryServer, name: str
) -> None:
    """Served as image/png under a .png name: the bytes decide."""
    assert_error(image_chat(stack, f"http://{PUBLIC_HOST}/{name}"), 400, "unsupported image")


def jpeg_with_thumbnail() -> bytes:
    """A JPEG whose EXIF segment holds a whole thumbnail JPEG (its own SOS and EOI)."""
    main, thumb = jpeg_bytes(), jpeg_bytes((8, 8))
    app1 = b"\xff\xe1" + (len(thumb) + 8).to_bytes(2, "big") + b"Exif\0\0" + thumb
    return main[:2] + app1 + main[2:]


def mpo_bytes() -> bytes:
    buf = io.BytesIO()
    frames = [Image.new("RGB", (16, 16), c) for c in ("red", "blue")]
    frames[0].save(buf, format="MPO", save_all=True, append_images=frames[1:])
    return buf.getvalue()


GOOD = {
    "JPEG": jpeg_bytes(),
    "progressive JPEG": jpeg_bytes(progressive=True),
    "JPEG with an EXIF thumbnail": jpeg_with_thumbnail(),
    # A motion photo: a video (here noise, with FF DA and FF D9 in it) after the EOI.
    "JPEG with data after its end": jpeg_bytes() + b"ftypmp42" + random.Random(3).randbytes(9000),
    "MPO (multi-picture JPEG)": mpo_bytes(),
    "PNG with 100 KB of text": png_bytes()[:33] + text_chunk(b"tEXt", 100 * KiB) + png_bytes()[33:],
    "PNG with a compressed text chunk": crafted_png(8, 8, after=text_chunk(b"zTXt", 500 * KiB)),
}


@pytest.mark.parametrize("name", list(GOOD))
def test_unusual_but_valid_images_accepted(stack: FakeStack, no_decoding: None, name: str) -> None:
    """The checks above refuse by structure, not by accident: these all pass."""
    assert image_chat(stack, data_uri(GOOD[name])).status_code == 200


def test_truncation_found_after_a_thumbnail(
    stack: FakeStack, no_decoding: None, nothing_encoded: None
) -> None:
    """The thumbnail's end marker does not vouch for the main image."""
    data = jpeg_with_thumbnail()
    assert_error(image_chat(stack, data_uri(data[:-300])), 400, "truncated")


# ---------------------------------------------------------------------------------------------
# Local paths
# ---------------------------------------------------------------------------------------------


def test_local_path_escapes_refused(stack: FakeStack, media_root: Path) -> None:
    allowed = media_root / "allowed"
    assert image_chat(stack, str(allowed / "ok.png")).status_code == 200
    assert image_chat(stack, str(allowed / "sub" / ".." / "ok.png")).status_code == 200
    escapes = [
        str(allowed / ".." / "secret.png"),  # `..`
        str(allowed / "sub" / ".." / ".." / "outside" / "secret.png"),
        str(media_root / "secret.png"),  # absolute, outside
        str(media_root / "allowed-evil" / "x.png"),  # shares the allowed path as a prefix
        str(allowed / "linkdir" / "secret.png"),  # a symlinked directory pointing outside
        "file://" + urllib.parse.quote(str(allowed)) + "/%2e%2e/secret.png",  # encoded `..`
        "file://localhost" + urllib.parse.quote(str(media_root / "secret.png")),
        "../" * 30 + "etc/passwd",  # relative: resolved against the gateway's directory
        "/proc/self/environ",
    ]
    for path in escapes:
        assert_error(image_chat(stack, path), 400, "outside")


# ---------------------------------------------------------------------------------------------
# API keys: 401 on every route but /health
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed(upstream: Upstream, canary_server: CanaryServer, dns: FakeDNS) -> Iterator[FakeStack]:
    s = make_stack(upstream, canary_server, api_key=KEY)
    yield s
    s.stop()


def app_routes(stack: FakeStack) -> list[tuple[str, str]]:
    """(method, path) of every route the app has; a kind of route this test does not know
    fails it, so nothing new can slip past."""
    out = []
    for route in stack.app.routes:
        assert isinstance(route, Route), f"unknown route kind {route!r}: cover it here"
        out += [(method, route.path) for method in sorted(route.methods or ())]
    return out


BAD_AUTH: dict[str, dict[str, str]] = {
    "missing": {},
    "empty": {"Authorization": ""},
    "empty bearer": {"Authorization": "Bearer"},
    "wrong": {"Authorization": "Bearer sk-wrong"},
    "wrong case": {"Authorization": f"Bearer {KEY.swapcase()}"},
    "upper case": {"Authorization": f"Bearer {KEY.upper()}"},
    "prefix": {"Authorization": f"Bearer {KEY[:-1]}"},
    "longer": {"Authorization": f"Bearer {KEY}x"},
    "no scheme": {"Authorization": KEY},
    "basic": {"Authorization": f"Basic {KEY}"},
    "other header": {"X-API-Key": KEY},
}


def test_api_key_required_on_every_route_but_health(keyed: FakeStack) -> None:
    routes = app_routes(keyed)
    paths = {path for _, path in routes}
    assert {"/v1/chat/completions", "/v1/responses", "/v1/models", "/metrics"} <= paths
    assert len(routes) >= 16, routes
    open_routes = {"/health", "/v1/health"}
    with httpx.Client(base_url=keyed.url, timeout=30) as client:
        for method, path in routes:
            for label, headers in BAD_AUTH.items():
                r = client.request(method, path, headers=headers, json={})
                if path in open_routes:
                    assert r.status_code == 200, (method, path, label)
                    continue
                err = assert_error(r, 401)
                assert err["code"] == "invalid_api_key", (method, path, label)
                assert r.headers.get("www-authenticate") == "Bearer", (method, path, label)
            # The right key (scheme in any case, as RFC 7235 has it) gets past the check.
            for scheme in ("Bearer", "bearer"):
                r = client.request(method, path, headers={"Authorization": f"{scheme} {KEY}"})
                assert r.status_code != 401, (method, path, scheme, r.text)


def test_routes_enumeration_sees_new_routes(keyed: FakeStack) -> None:
    """The enumeration above is the app's own list: a route added later is in it."""

    async def extra() -> dict[str, str]:
        return {}

    keyed.app.add_api_route("/v1/late-addition", extra, methods=["GET"])
    try:
        assert ("GET", "/v1/late-addition") in app_routes(keyed)
        # ...and this one, added without the auth dependency, would fail the test above.
        assert httpx.get(keyed.url + "/v1/late-addition", timeout=10).status_code == 200
    finally:
        keyed.app.router.routes.pop()
