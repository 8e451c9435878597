"""The gateway's OpenAI routes against fake backends, driven by the official openai client."""

from __future__ import annotations

import base64
import hashlib
import io

import httpx
import openai
import pytest
from PIL import Image

from services.gateway.testing import FakeDecoder, FakeEncoder, FakeServer, FakeStack, model_info

KEY = "sk-test-key"


def png_data_uri(size: tuple[int, int] = (8, 8)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def stack():
    models = [model_info("vl", ("text", "image", "video")), model_info("txt", ("text",))]
    encoder = FakeServer(FakeEncoder([models[0]]))
    decoder = FakeServer(FakeDecoder("d0", models))
    s = FakeStack([encoder], [decoder], api_key=KEY)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=stack.url + "/v1", api_key=KEY, max_retries=0, timeout=20)


def test_chat_non_stream(client, stack):
    out = client.chat.completions.create(
        model="txt", messages=[{"role": "user", "content": "hi"}], max_tokens=16, seed=3
    )
    assert out.id.startswith("chatcmpl-")
    assert out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == "Hello from d0"
    assert out.choices[0].finish_reason == "stop"
    assert out.usage.prompt_tokens == 10 and out.usage.completion_tokens == 3
    assert out.usage.total_tokens == 13
    assert out.usage.prompt_tokens_details.cached_tokens == 2
    req = stack.decoders[0].servicer.requests[-1]
    assert req.model == "txt" and req.stop.max_tokens == 16 and req.sampling.seed == 3
    assert req.messages.messages[0].content[0].text == "hi"


def test_chat_length_and_params_pass_through(client, stack):
    out = client.chat.completions.create(
        model="txt",
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "x"}],
        max_completion_tokens=2,
        temperature=0.5,
        top_p=0.9,
        stop=["\n", "END"],
        logit_bias={"42": 5},
        response_format={"type": "json_object"},
        tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
        tool_choice="auto",
        logprobs=True,
        top_logprobs=2,
        extra_body={"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1},
    )
    assert out.choices[0].finish_reason == "length"
    assert out.choices[0].message.content == "Hello from"
    req = stack.decoders[0].servicer.requests[-1]
    assert req.stop.max_tokens == 2 and list(req.stop.stop) == ["\n", "END"]
    assert req.sampling.top_k == 5 and req.sampling.logit_bias[42] == 5
    assert abs(req.sampling.temperature - 0.5) < 1e-6
    assert req.output.logprobs and req.output.top_logprobs == 2
    assert req.output.response_format.type == 1 and req.output.tool_choice == "auto"
    assert '"name": "f"' in req.messages.tools_json


def test_chat_stream_with_usage(client):
    chunks = list(
        client.chat.completions.create(
            model="txt",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello from d0"
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3
    assert len({c.id for c in chunks}) == 1


def test_chat_stream_raw_sse_ends_with_done(stack):
    body = {"model": "txt", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    headers = {"Authorization": f"Bearer {KEY}", "x-request-id": "req-abc"}
    r = httpx.post(stack.url + "/chat/completions", json=body, headers=headers, timeout=20)
    assert r.status_code == 200 and r.headers["x-request-id"] == "req-abc"
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.text.rstrip().endswith("data: [DONE]")
    assert '"id":"chatcmpl-req-abc"' in r.text


def test_chat_with_image_goes_through_encoder(client, stack):
    encoder = stack.encoders[0].servicer
    before = len(encoder.calls)
    out = client.chat.completions.create(
        model="vl",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": png_data_uri()}},
                    {"type": "image_url", "image_url": png_data_uri((4, 4))},
                    {"type": "text", "text": "what?"},
                ],
            }
        ],
        extra_headers={"X-APC-Tenant": "acme"},
    )
    assert out.choices[0].message.content == "Hello from d0"
    assert len(encoder.calls) == before + 1
    call = encoder.calls[-1]
    # Keys on: the tenant is the key's digest with the header as a sub-tenant.
    salt = hashlib.sha256(KEY.encode()).hexdigest()[:32] + ":acme"
    assert len(call.items) == 2 and call.items[0].modality == 2 and call.tenant == salt
    assert call.items[0].data.startswith(b"\x89PNG")
    req = stack.decoders[0].servicer.requests[-1]
    parts = req.messages.messages[0].content
    assert [p.WhichOneof("part") for p in parts] == ["media", "media", "text"]
    assert parts[0].media.num_tokens == 4 and req.tenant == salt


def test_responses_non_stream(client):
    r = client.responses.create(
        model="txt", input="hi", instructions="be nice", max_output_tokens=8
    )
    assert r.id.startswith("resp_") and r.object == "response" and r.status == "completed"
    assert r.output_text == "Hello from d0"
    assert r.output[0].type == "message" and r.output[0].content[0].type == "output_text"
    assert r.usage.input_tokens == 10 and r.usage.output_tokens == 3
    assert r.usage.input_tokens_details.cached_tokens == 2


def test_responses_with_input_image_and_incomplete(client, stack):
    r = client.responses.create(
        model="vl",
        input=[
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "describe"},
                    {"type": "input_image", "image_url": png_data_uri(), "detail": "auto"},
                ],
            }
        ],
        max_output_tokens=1,
    )
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.output_text == "Hello"
    msg = stack.decoders[0].servicer.requests[-1].messages.messages[0]
    assert [p.WhichOneof("part") for p in msg.content] == ["text", "media"]


def test_responses_stream_events(client):
    events = list(client.responses.create(model="txt", input="hi", stream=True))
    types = [e.type for e in events]
    assert types[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert types[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert "".join(deltas) == "Hello from d0"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    done = events[-1].response
    assert done.status == "completed" and done.output_text == "Hello from d0"
    assert done.usage.output_tokens == 3


def test_models_list(client):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"vl", "txt"}
    vl = models["vl"]
    assert vl.object == "model" and vl.owned_by == "prism"
    assert vl.model_extra["modalities"] == ["text", "image", "video"]
    assert models["txt"].model_extra["modalities"] == ["text"]


def test_routes_without_v1_prefix_and_health(stack):
    auth = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(stack.url + "/health").json() == {"status": "ok"}  # no key needed
    assert httpx.get(stack.url + "/models", headers=auth).json()["object"] == "list"
    ready = httpx.get(stack.url + "/ready", headers=auth)
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


def test_metrics_exposed(client, stack):
    client.chat.completions.create(model="txt", messages=[{"role": "user", "content": "m"}])
    text = httpx.get(stack.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    for name in (
        "prism:num_requests_running",
        "prism:num_requests_waiting",
        "prism:time_to_first_token_seconds_bucket",
        "prism:inter_token_latency_seconds_bucket",
        "prism:e2e_request_latency_seconds_bucket",
        "prism:prompt_tokens_total",
        "prism:generation_tokens_total",
    ):
        assert name in text, name
    assert 'prism:generation_tokens_total{model_name="txt"}' in text
    assert 'prism:num_requests_running{model_name="txt"} 0.0' in text


def _metric(text: str, name: str) -> float:
    """One sample's value from a Prometheus text page (0 when absent)."""
    line = next((x for x in text.splitlines() if x.startswith(name + " ")), None)
    return float(line.split()[-1]) if line else 0.0


def test_metrics_split_time_to_first_token_into_phases(client, stack):
    auth = {"Authorization": f"Bearer {KEY}"}
    page = lambda: httpx.get(stack.url + "/metrics", headers=auth).text  # noqa: E731
    before = page()
    image = {"type": "image_url", "image_url": {"url": png_data_uri()}}
    for model, content in (("vl", [image, {"type": "text", "text": "x"}]), ("txt", "y")):
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}])
    after = page()

    def delta(phase: str, model: str, stat: str) -> float:
        name = f'prism:request_{phase}_time_seconds_{stat}{{model_name="{model}"}}'
        return _metric(after, name) - _metric(before, name)

    # The decoder's own timings (the fake sends 1, 2, 3 and 4 ms): queue = fetch + admission.
    for model in ("vl", "txt"):
        assert delta("queue", model, "sum") == pytest.approx(0.003)
        assert delta("prefill", model, "sum") == pytest.approx(0.003)
        assert delta("decode", model, "sum") == pytest.approx(0.004)
    # Media phases are timed at the gateway, for requests that carry media only.
    for phase in ("media", "encode"):
        assert delta(phase, "vl", "count") == 1 and delta(phase, "vl", "sum") > 0
        assert delta(phase, "txt", "count") == 0


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}],
    ids=["missing", "wrong", "not-bearer"],
)
def test_api_key_required(stack, headers):
    for method, path in (
        ("GET", "/v1/models"),
        ("POST", "/v1/chat/completions"),
        ("GET", "/metrics"),
    ):
        r = httpx.request(method, stack.url + path, headers=headers, json={})
        assert r.status_code == 401, path
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["code"] == "invalid_api_key"
        assert set(err) == {"message", "type", "param", "code"}


def test_openai_client_sees_auth_error(stack):
    bad = openai.OpenAI(base_url=stack.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
