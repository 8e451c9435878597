"""Routing over several fake backends: round-robin, health, retries, overload, cancellation, and
media fetched by URL from a loopback canary (allowed by the explicit test-only allow-list)."""

from __future__ import annotations

import base64
import contextlib
import io
import time

import httpx
import openai
import pytest
from PIL import Image

from services.gateway.testing import (
    CanaryServer,
    FakeDecoder,
    FakeEncoder,
    FakeServer,
    FakeStack,
    model_info,
)


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (0, 9, 0)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def canary():
    server = CanaryServer({"cat.png": png()})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stack():
    models = [model_info("vl", ("text", "image")), model_info("txt", ("text",))]
    s = FakeStack(
        [FakeServer(FakeEncoder([models[0]]))],
        [FakeServer(FakeDecoder("d1", models)), FakeServer(FakeDecoder("d2", models))],
        allow_fetch_from=["127.0.0.1/32"],
    )
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=stack.url + "/v1", api_key="unused", max_retries=0, timeout=20)


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def healthy(stack, server: FakeServer) -> bool:
    return any(b.healthy for b in stack.app.state.pools.backends if b.address == server.address)


@contextlib.contextmanager
def down(stack, server: FakeServer):
    """Take a fake backend out of service (health NOT_SERVING) until the block ends."""
    server.set_serving(False)
    wait_for(lambda: not healthy(stack, server))
    try:
        yield
    finally:
        server.set_serving(True)
        wait_for(lambda: healthy(stack, server))


def ask(client, model="txt", content="hi", **kw):
    messages = [{"role": "user", "content": content}]
    return client.chat.completions.create(model=model, messages=messages, **kw)


def image_content(url: str):
    return [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": url}}]


def test_round_robin_over_two_decoders(client):
    texts = [ask(client).choices[0].message.content for _ in range(6)]
    assert texts.count("Hello from d1") == 3 and texts.count("Hello from d2") == 3


def test_unhealthy_decoder_is_skipped_and_ready_says_so(client, stack):
    d2 = stack.decoders[1]
    with down(stack, d2):
        texts = {ask(client).choices[0].message.content for _ in range(4)}
        assert texts == {"Hello from d1"}
        r = httpx.get(stack.url + "/ready")
        assert r.status_code == 503
        assert r.json()["error"]["type"] == "server_error"
        assert any(d2.address in reason for reason in r.json()["down"])
    assert httpx.get(stack.url + "/ready").status_code == 200


def test_missing_features_reencoded_once(client, stack, canary):
    d1, encoder = stack.decoders[0].servicer, stack.encoders[0].servicer
    with down(stack, stack.decoders[1]):
        d1.missing_once = True
        before_enc, before_dec = len(encoder.calls), len(d1.requests)
        out = ask(client, "vl", image_content(canary.url("cat.png")))
        assert out.choices[0].message.content == "Hello from d1"
        assert len(encoder.calls) == before_enc + 2
        assert len(d1.requests) == before_dec + 2


def test_image_url_fetched_from_canary_and_redirect_checked(client, stack, canary):
    encoder = stack.encoders[0].servicer
    redirect = canary.url("redirect?to=" + canary.url("cat.png"))
    ask(client, "vl", image_content(redirect))
    assert encoder.calls[-1].items[0].data == png()
    bad = canary.url(f"redirect?to=http://127.0.0.2:{canary.port}/cat.png")
    with pytest.raises(openai.BadRequestError, match="127.0.0.2"):
        ask(client, "vl", image_content(bad))


def test_overloaded_decoder_is_429_before_any_byte(client, stack):
    d1 = stack.decoders[0].servicer
    with down(stack, stack.decoders[1]):
        d1.overloaded = True
        try:
            with pytest.raises(openai.RateLimitError):
                ask(client)
            body = {"model": "txt", "messages": [{"role": "user", "content": "x"}], "stream": True}
            r = httpx.post(stack.url + "/v1/chat/completions", json=body)
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "rate_limit_error"
        finally:
            d1.overloaded = False


def test_no_encoder_image_503_text_still_ok(client, stack, canary):
    with down(stack, stack.encoders[0]):
        with pytest.raises(openai.InternalServerError) as info:
            ask(client, "vl", image_content(canary.url("cat.png")))
        assert info.value.status_code == 503
        assert "no encoder available for model vl" in str(info.value)
        assert ask(client, "vl").choices[0].message.content.startswith("Hello")


def test_no_decoder_is_503(client, stack):
    with down(stack, stack.decoders[1]), down(stack, stack.decoders[0]):
        with pytest.raises(openai.InternalServerError) as info:
            ask(client)
        assert info.value.status_code == 503


@pytest.mark.parametrize(
    "stream, delay",
    [(True, 0.02), (False, 0.02), (True, 3.0), (False, 3.0)],
    ids=["stream-mid", "nonstream-mid", "stream-before-first-token", "nonstream-before-first"],
)
def test_client_disconnect_cancels_decoder_stream(stack, stream, delay):
    d1 = stack.decoders[0].servicer
    with down(stack, stack.decoders[1]):
        d1.pieces, d1.delay = ["tok "] * 500, delay
        d1.cancelled.clear()
        body = {"model": "txt", "messages": [{"role": "user", "content": "x"}], "stream": stream}
        url = stack.url + "/v1/chat/completions"
        try:
            if stream and delay < 1:
                with httpx.stream("POST", url, json=body) as r:
                    assert next(r.iter_lines()).startswith("data: ")
                    # leaving the block closes the connection mid-stream
            else:
                with pytest.raises(httpx.ReadTimeout):
                    httpx.post(url, json=body, timeout=0.5)
            # well within one 3 s token: the gateway cancelled the call, it did not time out
            assert d1.cancelled.wait(2), "the decoder stream was not cancelled"
        finally:
            d1.pieces, d1.delay = ["Hello", " from", " d1"], 0.0
    text = 'prism:num_requests_running{model_name="txt"} 0.0'
    wait_for(lambda: text in metrics(stack))
    assert 'prism:num_requests_waiting{model_name="txt"} 0.0' in metrics(stack)


def metrics(stack) -> str:
    return httpx.get(stack.url + "/metrics").text


def test_base64_roundtrip_through_encoder(client, stack):
    uri = "data:image/png;base64," + base64.b64encode(png()).decode()
    ask(client, "vl", image_content(uri))
    assert stack.encoders[0].servicer.calls[-1].items[0].data == png()
