"""Every refusal is a 4xx in OpenAI's error shape, and the gateway keeps serving afterwards.

SSRF cases never leave the machine: the policy refuses before any connect, and the fetcher's
inner network backend is replaced by a spy that records (and refuses) any connect attempt.
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import random
import struct
import time
import zlib

import httpx
import pytest
from PIL import Image

from services.gateway import ssrf
from services.gateway.testing import FakeDecoder, FakeEncoder, FakeServer, FakeStack, model_info

MAX_IMAGE_BYTES = 300_000
MAX_BODY = 2 * 1024 * 1024


class SpyBackend:
    """Stands in for the real network backend: records connects, never opens a socket."""

    def __init__(self) -> None:
        self.connects: list[tuple[str, int]] = []

    async def connect_tcp(self, host, port, **kwargs):
        self.connects.append((host, port))
        raise OSError("test spy: no network")

    async def sleep(self, seconds):  # pragma: no cover
        pass


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    (root / "allowed").mkdir()
    Image.new("RGB", (8, 8)).save(root / "allowed" / "ok.png")
    Image.new("RGB", (8, 8)).save(root / "secret.png")
    (root / "allowed" / "link.png").symlink_to(root / "secret.png")
    return root


@pytest.fixture(scope="module")
def stack(media_dir):
    models = [model_info("vl", ("text", "image", "video")), model_info("txt", ("text",))]
    s = FakeStack(
        [FakeServer(FakeEncoder([models[0]]))],
        [FakeServer(FakeDecoder("d0", models))],
        allowed_local_media_path=str(media_dir / "allowed"),
        max_image_bytes=MAX_IMAGE_BYTES,
        max_body_bytes=MAX_BODY,
    )
    s.spy = SpyBackend()
    s.app.state.fetcher.backend.inner = s.spy
    yield s
    s.stop()


def image_bytes(fmt: str, size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (1, 2, 3)).save(buf, format=fmt)
    return buf.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def huge_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height pixels, with (almost) no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00")
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def chat(stack, content, model="vl", **extra):
    body = {"model": model, "messages": [{"role": "user", "content": content}], **extra}
    return httpx.post(stack.url + "/v1/chat/completions", json=body, timeout=30)


def image_msg(url):
    return [{"type": "text", "text": "see"}, {"type": "image_url", "image_url": {"url": url}}]


def assert_error(r: httpx.Response, status: int, needle: str = "") -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["type"]
    assert needle.lower() in err["message"].lower(), err["message"]
    return err


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": -3}, "max_completion_tokens"),
        ({"n": 2}, "n"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"top_logprobs": 50}, "top_logprobs"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"messages": []}, "messages"),
        ({"messages": [{"content": "no role"}]}, "messages.0.role"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"response_format": {"type": "yaml"}}, "response_format"),
    ],
)
def test_invalid_fields_are_400(stack, extra, param):
    body = {"model": "txt", "messages": [{"role": "user", "content": "hi"}], **extra}
    r = httpx.post(stack.url + "/v1/chat/completions", json=body)
    err = assert_error(r, 400)
    assert err["param"] == param and err["type"] == "invalid_request_error"


def test_unknown_model_is_404(stack):
    err = assert_error(chat(stack, "hi", model="nope"), 404, "nope")
    assert err["code"] == "model_not_found" and err["param"] == "model"
    r = httpx.post(stack.url + "/v1/responses", json={"model": "nope", "input": "x"})
    assert_error(r, 404)


def test_bad_bodies(stack):
    url = stack.url + "/v1/chat/completions"
    assert_error(httpx.post(url, content=b"{not json"), 400, "json")
    assert_error(httpx.post(url, content=b"[1, 2]"), 400, "object")
    assert_error(httpx.post(url, content=b""), 400, "empty")
    assert_error(httpx.get(stack.url + "/v1/nothing-here"), 404)
    assert_error(httpx.get(url), 405)


def test_oversized_body_is_413(stack):
    big = b'{"model": "txt", "pad": "' + b"x" * (MAX_BODY + 10) + b'"}'
    r = httpx.post(stack.url + "/v1/chat/completions", content=big, timeout=30)
    assert_error(r, 413, "limit")

    def chunked():  # no Content-Length: the cap applies while reading
        for _ in range(3):
            yield b"x" * (MAX_BODY // 2)

    r = httpx.post(stack.url + "/v1/chat/completions", content=chunked(), timeout=30)
    assert_error(r, 413, "limit")


def test_image_limits(stack):
    png = data_uri(image_bytes("PNG"))
    assert_error(chat(stack, [{"type": "image_url", "image_url": png}] * 6), 400, "6 images")
    noisy = Image.frombytes("RGB", (400, 400), random.Random(0).randbytes(400 * 400 * 3))
    buf = io.BytesIO()
    noisy.save(buf, format="PNG")
    assert len(buf.getvalue()) > MAX_IMAGE_BYTES
    assert_error(chat(stack, image_msg(data_uri(buf.getvalue()))), 400, "limit")
    assert_error(chat(stack, image_msg("data:image/png;base64,@@not base64@@")), 400, "base64")
    assert_error(chat(stack, image_msg("data:image/png,plain")), 400, "base64")


def test_decompression_bomb_refused_from_header(stack):
    start = time.perf_counter()
    assert_error(chat(stack, image_msg(data_uri(huge_png(20000, 20000)))), 400, "pixels")
    assert_error(chat(stack, image_msg(data_uri(huge_png(8000, 8000)))), 400, "pixels")
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP"])
def test_accepted_image_formats(stack, fmt):
    r = chat(stack, image_msg(data_uri(image_bytes(fmt), "image/" + fmt.lower())))
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("fmt", ["BMP", "TIFF"])
def test_refused_image_formats_despite_mime(stack, fmt):
    # The data URI claims PNG: the content decides.
    assert_error(chat(stack, image_msg(data_uri(image_bytes(fmt), "image/png"))), 400, "format")


def test_local_paths(stack, media_dir):
    ok = media_dir / "allowed" / "ok.png"
    assert chat(stack, image_msg(str(ok))).status_code == 200
    assert chat(stack, image_msg(ok.as_uri())).status_code == 200
    for bad in (
        str(media_dir / "secret.png"),
        str(media_dir / "allowed" / ".." / "secret.png"),
        str(media_dir / "allowed" / "link.png"),  # symlink pointing outside
        "file:///etc/passwd",
    ):
        assert_error(chat(stack, image_msg(bad)), 400, "outside")


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/a.png",
        "http://localhost:8080/a.png",
        "http://169.254.169.254/latest/meta-data",
        "http://[::ffff:169.254.169.254]/",
        "http://[::1]/",
        "http://2130706433/",
        "http://0x7f000001/",
        "http://017700000001/",
        "http://10.0.0.1/",
        "http://100.64.0.1/",
        "http://0.0.0.0/",
    ],
)
def test_ssrf_refused(stack, url):
    assert_error(chat(stack, image_msg(url)), 400, "refusing")
    assert stack.spy.connects == []


def test_ssrf_name_resolving_to_private(stack, monkeypatch):
    import ipaddress

    monkeypatch.setattr(ssrf, "resolve", lambda host, port=0: [ipaddress.ip_address("10.0.0.1")])
    assert_error(chat(stack, image_msg("https://images.example.test/cat.png")), 400, "10.0.0.1")
    assert stack.spy.connects == []


def test_unsupported_scheme_and_bad_urls(stack):
    assert_error(chat(stack, image_msg("ftp://example.com/a.png")), 400, "scheme")
    for url in ("http://[::1/a.png", "http:///a.png", "http://exa mple.com/"):
        assert_error(chat(stack, image_msg(url)), 400)
    assert stack.spy.connects == []


def test_modalities_enforced(stack):
    video = [{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}]
    err = assert_error(chat(stack, video, model="txt"), 400, "accepts text")
    assert "video" in err["message"]
    audio = [{"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}]
    assert_error(chat(stack, audio, model="vl"), 400, "text, image, video")
    assert_error(chat(stack, [{"type": "hologram"}]), 400, "unsupported content part")
    assert chat(stack, video, model="vl").status_code == 200  # the fake encoder takes anything


def test_unexpected_exception_is_500_json(stack, monkeypatch):
    pipeline = stack.app.state.pipeline

    def boom(model):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(pipeline, "model_info", boom)
    r = chat(stack, "hi", model="txt")
    err = assert_error(r, 500)
    assert "kaboom" not in r.text and r.headers.get("x-request-id")
    assert err["type"] == "server_error"


def test_still_serving_after_50_concurrent_invalid_requests(stack):
    bodies = [
        {"model": "txt", "messages": [], "temperature": 9},
        {"model": "nope", "messages": [{"role": "user", "content": "x"}]},
        {"model": "vl", "messages": [{"role": "user", "content": image_msg("http://10.0.0.1/")}]},
        {"model": "vl", "messages": [{"role": "user", "content": image_msg("data:,@@")}]},
    ]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        codes = list(
            pool.map(
                lambda i: (
                    httpx.post(
                        stack.url + "/v1/chat/completions", json=bodies[i % 4], timeout=30
                    ).status_code
                ),
                range(50),
            )
        )
    assert all(400 <= c < 500 for c in codes), codes
    r = chat(stack, "still there?", model="txt")
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
    metrics = httpx.get(stack.url + "/metrics").text
    assert 'prism:request_errors_total{kind="invalid_request"}' in metrics


WEIRD = [
    ("chat", {"max_tokens": 2**40}),
    ("chat", {"top_k": 2**40}),
    ("chat", {"stop_token_ids": [-1]}),
    ("chat", {"tool_choice": 5}),
    ("chat", {"tool_choice": "sometimes"}),
    ("chat", {"tools": [{"type": "web_search"}]}),
    ("chat", {"messages": [{"role": "user", "content": {"a": 1}}]}),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "video_url", "fps": 1e30}]}]}),
    ("chat", {"messages": [{"role": "user", "content": image_msg("/tmp/\x00x")}]}),
    ("chat", {"response_format": {"type": "json_schema", "json_schema": "nope"}}),
    ("responses", {"input": 5}),
    ("responses", {"input": "x", "text": {"format": "json"}}),
    ("responses", {"input": "x", "previous_response_id": "resp_1"}),
    ("responses", {"input": [{"role": "user", "content": [{"type": "input_image"}]}]}),
]


@pytest.mark.parametrize("api, fields", WEIRD, ids=[str(i) for i in range(len(WEIRD))])
def test_odd_inputs_are_400_never_500(stack, api, fields):
    if api == "chat":
        body = {"model": "vl", "messages": [{"role": "user", "content": "hi"}], **fields}
    else:
        body = {"model": "vl", **fields}
    assert_error(
        httpx.post(f"{stack.url}/v1/{api.replace('chat', 'chat/completions')}", json=body), 400
    )


def test_nan_is_400(stack):
    raw = b'{"model": "txt", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}'
    assert_error(httpx.post(stack.url + "/v1/chat/completions", content=raw), 400, "temperature")
