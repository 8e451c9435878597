"""The official OpenAI OpenAPI document accepts what the gateway sends (issue #9).

Real gateway outputs (a FakeStack: the real gateway over uvicorn, fake gRPC decoders that stream
scripted events) are validated with jsonschema against the component schemas of OpenAI's own
document, pinned in tests/data/openai-openapi.yaml (see tests/data/README.md):

- chat: CreateChatCompletionResponse; every SSE chunk against CreateChatCompletionStreamResponse
  (text, reasoning, tool calls, logprobs, include_usage), an in-band stream error against
  ErrorResponse;
- responses: Response (completed, incomplete, tool calls, reasoning, logprobs); every streamed
  event against the event schema the document names for its `type` (the map is read from the
  document's ResponseStreamEvent union, so an event type OpenAI does not define fails) and
  against the union itself; response.failed;
- errors: 400, 404, 401 and 413 bodies against ErrorResponse.

The document is OpenAPI 3.1 (JSON Schema 2020-12) but still marks some fields with OpenAPI 3.0's
`nullable: true` (e.g. a chunk's `finish_reason`, which OpenAI itself sends as null); plain JSON
Schema ignores that keyword, so it is translated to `anyOf [schema, null]`, which is what it
means. `format` is an annotation only (2020-12 default). Nothing else is changed.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prism.v1 import common_pb2, decoder_pb2

from services.gateway.testing import FakeDecoder, FakeServer, FakeStack, model_info

jsonschema = pytest.importorskip("jsonschema")
referencing = pytest.importorskip("referencing")
from referencing.jsonschema import DRAFT202012  # noqa: E402

SPEC_PATH = Path(__file__).parent / "data" / "openai-openapi.yaml"
# openai/openai-openapi, openapi.yaml at commit f85dbe223d40e1a31cba812ab2d755c7e98a92a3:
# its git blob id (sha1 over "blob <size>\0" + bytes), so the copy is provably unmodified.
PINNED_BLOB = "cc54f3a8e4c6737bd945051cd6654e0a20913743"
BASE_URI = "urn:openai-openapi"
KEY = "sk-spec-test"
Json = dict[str, Any]


# --- the document ------------------------------------------------------------------------------


def nullable_to_anyof(node: Any) -> Any:
    """OpenAPI 3.0's `nullable: true` -> JSON Schema `anyOf [schema, {"type": "null"}]`."""
    if isinstance(node, list):
        return [nullable_to_anyof(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: nullable_to_anyof(v) for k, v in node.items() if k != "nullable"}
    if node.get("nullable") is True:
        return {"anyOf": [out, {"type": "null"}]}
    return out


@cache
def raw_spec() -> Json:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load(SPEC_PATH.read_bytes(), Loader=loader)  # noqa: S506 - a safe loader


@cache
def registry() -> Any:
    resource = DRAFT202012.create_resource(nullable_to_anyof(raw_spec()))
    return referencing.Registry().with_resource(BASE_URI, resource)


@cache
def validator(component: str) -> Any:
    assert component in raw_spec()["components"]["schemas"], f"no component {component}"
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$ref": f"{BASE_URI}#/components/schemas/{component}",
    }
    return jsonschema.Draft202012Validator(schema, registry=registry())


def spec_errors(component: str, instance: Any) -> list[str]:
    errors = sorted(validator(component).iter_errors(instance), key=lambda e: list(e.path))
    out = []
    for e in errors:
        # anyOf/oneOf failures: name the closest branch's reasons, not only "is not valid".
        best = jsonschema.exceptions.best_match(e.context) if e.context else e
        where = "/".join(map(str, best.absolute_path)) or "<root>"
        out.append(f"{where}: {best.message[:300]}")
    return out


def assert_conforms(component: str, instance: Any) -> None:
    errors = spec_errors(component, instance)
    assert not errors, f"{component}:\n" + "\n".join(errors) + f"\n{json.dumps(instance)[:2000]}"


@cache
def stream_event_components() -> dict[str, str]:
    """Event `type` -> the component schema that defines it, from ResponseStreamEvent."""
    schemas = raw_spec()["components"]["schemas"]
    out = {}
    for branch in schemas["ResponseStreamEvent"]["anyOf"]:
        name = branch["$ref"].rsplit("/", 1)[1]
        for value in schemas[name]["properties"]["type"].get("enum", []):
            out[value] = name
    return out


# --- the stack ---------------------------------------------------------------------------------


def delta(
    text: str = "",
    reasoning: str = "",
    calls: tuple[tuple[str, str, str], ...] = (),
    logprob: bool = False,
) -> decoder_pb2.GenerateResponse:
    tcs = [decoder_pb2.ToolCall(id=i, name=n, arguments=a) for i, n, a in calls]
    lps = []
    if logprob:
        top = [
            decoder_pb2.TopLogprob(token_id=7, token=text, logprob=-0.1),
            decoder_pb2.TopLogprob(token_id=8, token="x", logprob=-2.5),
        ]
        lps = [decoder_pb2.TokenLogprob(token_id=7, token=text, logprob=-0.1, top_logprobs=top)]
    d = decoder_pb2.Delta(
        text=text, reasoning_text=reasoning, tool_calls=tcs, logprobs=lps, token_ids=[7]
    )
    return decoder_pb2.GenerateResponse(delta=d)


def finish(
    reason: int = decoder_pb2.FINISH_REASON_STOP, error: str = ""
) -> decoder_pb2.GenerateResponse:
    usage = common_pb2.Usage(
        prompt_tokens=11, completion_tokens=6, cached_prompt_tokens=4, reasoning_tokens=2
    )
    f = decoder_pb2.Finish(reason=reason, usage=usage, error=error)
    return decoder_pb2.GenerateResponse(finish=f)


CALL = (("call_1", "get_weather", ""), ("call_1", "", '{"city": '), ("call_1", "", '"Paris"}'))
SCRIPTS: dict[str, list[decoder_pb2.GenerateResponse] | None] = {
    "plain": None,  # the fake's default: "Hello from d0", finish STOP
    "logprobs": [delta("Hel", logprob=True), delta("lo", logprob=True), finish()],
    "reasoning": [delta(reasoning="Think "), delta(reasoning="hard."), delta("42"), finish()],
    "tools": [
        delta(reasoning="Need weather."),
        *(delta(calls=(c,)) for c in CALL),
        finish(decoder_pb2.FINISH_REASON_TOOL_CALLS),
    ],
    "text_and_tools": [
        delta("Checking."),
        *(delta(calls=(c,)) for c in CALL),
        finish(decoder_pb2.FINISH_REASON_TOOL_CALLS),
    ],
    "length": [delta("cut"), delta(" short"), finish(decoder_pb2.FINISH_REASON_LENGTH)],
    "error": [delta("partial"), finish(decoder_pb2.FINISH_REASON_ERROR, "boom")],
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
RESPONSES_TOOLS = [{"type": "function", **TOOLS[0]["function"]}]


@pytest.fixture(scope="module")
def stack() -> Iterator[FakeStack]:
    decoder = FakeServer(FakeDecoder("d0", [model_info("txt", ("text",))]))
    s = FakeStack([], [decoder], api_key=KEY, max_body_bytes=64 * 1024)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def http(stack: FakeStack) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=stack.url + "/v1", headers=headers, timeout=20) as client:
        yield client


@pytest.fixture
def fake(stack: FakeStack) -> Iterator[FakeDecoder]:
    servicer = stack.decoders[0].servicer
    assert isinstance(servicer, FakeDecoder)
    yield servicer
    servicer.script = None


def sse_events(text: str) -> list[tuple[str | None, str]]:
    """(event name or None, data) per SSE event."""
    events = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        name, data = None, []
        for line in block.split("\n"):
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                name = value
            elif field == "data":
                data.append(value)
        events.append((name, "\n".join(data)))
    return events


def post(http: httpx.Client, path: str, body: Json) -> httpx.Response:
    reply = http.post(path, json=body)
    if body.get("stream"):
        assert reply.headers["content-type"].startswith("text/event-stream"), reply.text
    return reply


def chat_body(script: str, **extra: Any) -> Json:
    body: Json = {"model": "txt", "messages": [{"role": "user", "content": "hi"}], **extra}
    if script in ("tools", "text_and_tools"):
        body["tools"] = TOOLS
    if script == "logprobs":
        body.update(logprobs=True, top_logprobs=2)
    return body


def responses_body(script: str, **extra: Any) -> Json:
    body: Json = {"model": "txt", "input": "hi", "instructions": "be brief", **extra}
    if script in ("tools", "text_and_tools"):
        body["tools"] = RESPONSES_TOOLS
    if script == "logprobs":
        body.update(include=["message.output_text.logprobs"], top_logprobs=2)
    return body


# --- the document itself -----------------------------------------------------------------------


def test_vendored_document_is_the_pinned_upstream_blob() -> None:
    data = SPEC_PATH.read_bytes()
    blob = hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()
    assert blob == PINNED_BLOB, "tests/data/openai-openapi.yaml differs from the pinned upstream"
    assert raw_spec()["openapi"].startswith("3.1")


def test_validation_is_live() -> None:
    """The schemas bite: fields we would never send wrong are refused when wrong."""
    good = {"error": {"message": "m", "type": "invalid_request_error", "param": None, "code": None}}
    assert_conforms("ErrorResponse", good)
    assert spec_errors("ErrorResponse", {"error": {"message": "m"}})  # type/param/code missing
    assert spec_errors("ErrorResponse", {"detail": "FastAPI's default shape"})
    chunk = {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": None}],
    }
    assert_conforms("CreateChatCompletionStreamResponse", chunk)
    wrong = copy.deepcopy(chunk)
    wrong["choices"][0]["finish_reason"] = "eos"
    assert spec_errors("CreateChatCompletionStreamResponse", wrong)
    wrong = {**chunk, "object": "chat.completion"}
    assert spec_errors("CreateChatCompletionStreamResponse", wrong)
    # Without translating `nullable`, OpenAI's own null finish_reason would be refused.
    plain = jsonschema.Draft202012Validator(
        {"$ref": f"{BASE_URI}#/components/schemas/CreateChatCompletionStreamResponse"},
        registry=referencing.Registry().with_resource(
            BASE_URI, DRAFT202012.create_resource(raw_spec())
        ),
    )
    assert not plain.is_valid(chunk)
    assert "response.output_text.delta" in stream_event_components()
    assert spec_errors("ResponseStreamEvent", {"type": "response.thinking", "sequence_number": 0})


# --- chat completions --------------------------------------------------------------------------


@pytest.mark.parametrize("script", ["plain", "logprobs", "reasoning", "tools", "text_and_tools"])
def test_chat_completion_conforms(http: httpx.Client, fake: FakeDecoder, script: str) -> None:
    fake.script = SCRIPTS[script]
    reply = post(http, "/chat/completions", chat_body(script))
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert_conforms("CreateChatCompletionResponse", body)
    if script == "tools":
        assert body["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    if script == "logprobs":
        assert body["choices"][0]["logprobs"]["content"][0]["top_logprobs"]


@pytest.mark.parametrize("script", ["plain", "logprobs", "reasoning", "tools", "length"])
@pytest.mark.parametrize("usage", [False, True])
def test_chat_stream_chunks_conform(
    http: httpx.Client, fake: FakeDecoder, script: str, usage: bool
) -> None:
    fake.script = SCRIPTS[script]
    extra: Json = {"stream": True}
    if usage:
        extra["stream_options"] = {"include_usage": True}
    reply = post(http, "/chat/completions", chat_body(script, **extra))
    assert reply.status_code == 200, reply.text
    events = sse_events(reply.text)
    assert events[-1] == (None, "[DONE]")
    chunks = [json.loads(data) for _, data in events[:-1]]
    assert len(chunks) >= 3
    for chunk in chunks:
        assert_conforms("CreateChatCompletionStreamResponse", chunk)
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] in ("stop", "length", "tool_calls") and finishes[0] is None
    if usage:
        last = chunks[-1]
        assert last["choices"] == [] and last["usage"]["completion_tokens"] > 0
        assert all(c["usage"] is None for c in chunks[:-1])


def test_chat_stream_error_conforms(http: httpx.Client, fake: FakeDecoder) -> None:
    """A failure after the 200 went out is an in-band `{"error": ...}` event in OpenAI's shape."""
    fake.script = SCRIPTS["error"]
    reply = post(http, "/chat/completions", chat_body("error", stream=True))
    events = sse_events(reply.text)
    payloads = [json.loads(data) for _, data in events if data != "[DONE]"]
    errors = [p for p in payloads if "error" in p]
    assert len(errors) == 1, payloads
    assert_conforms("ErrorResponse", errors[0])
    for chunk in payloads:
        if "error" not in chunk:
            assert_conforms("CreateChatCompletionStreamResponse", chunk)


# --- responses ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "script", ["plain", "logprobs", "reasoning", "tools", "text_and_tools", "length"]
)
def test_response_object_conforms(http: httpx.Client, fake: FakeDecoder, script: str) -> None:
    fake.script = SCRIPTS[script]
    extra = {"max_output_tokens": 64, "metadata": {"k": "v"}, "temperature": 0.5}
    reply = post(http, "/responses", responses_body(script, **extra))
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert_conforms("Response", body)
    types = [item["type"] for item in body["output"]]
    expected = {
        "plain": ["message"],
        "logprobs": ["message"],
        "reasoning": ["reasoning", "message"],
        "tools": ["reasoning", "function_call"],
        "text_and_tools": ["message", "function_call"],
        "length": ["message"],
    }[script]
    assert types == expected
    assert body["status"] == ("incomplete" if script == "length" else "completed")


@pytest.mark.parametrize(
    "script", ["plain", "logprobs", "reasoning", "tools", "text_and_tools", "length", "error"]
)
def test_response_stream_events_conform(http: httpx.Client, fake: FakeDecoder, script: str) -> None:
    fake.script = SCRIPTS[script]
    reply = post(http, "/responses", responses_body(script, stream=True))
    assert reply.status_code == 200, reply.text
    known = stream_event_components()
    events = sse_events(reply.text)
    seen = []
    for name, data in events:
        event = json.loads(data)
        kind = event["type"]
        assert name == kind, "the SSE event name is the payload's type"
        assert kind in known, f"{kind} is not an OpenAI Responses stream event"
        # known[kind] is one of ResponseStreamEvent's anyOf branches, so this also proves
        # the event valid against the union.
        assert_conforms(known[kind], event)
        seen.append(kind)
    assert [e["sequence_number"] for e in map(json.loads, (d for _, d in events))] == list(
        range(len(events))
    )
    last = {"length": "response.incomplete", "error": "response.failed"}
    assert seen[:2] == ["response.created", "response.in_progress"]
    assert seen[-1] == last.get(script, "response.completed")
    if script == "reasoning":
        assert "response.reasoning_text.delta" in seen
    if script in ("tools", "text_and_tools"):
        assert "response.output_item.done" in seen


# --- errors ------------------------------------------------------------------------------------


def test_error_bodies_conform(http: httpx.Client, stack: FakeStack) -> None:
    cases: list[tuple[int, httpx.Response]] = [
        (400, http.post("/chat/completions", json={"model": "txt", "messages": []})),
        (400, http.post("/chat/completions", json={"model": "txt", "temperature": 9})),
        (400, http.post("/responses", content=b"{not json", headers={"content-type": "x"})),
        (400, http.post("/chat/completions", json=chat_body("plain", n=3))),
        (404, http.post("/chat/completions", json={**chat_body("plain"), "model": "nope"})),
        (404, http.post("/responses", json={**responses_body("plain"), "model": "nope"})),
        (413, http.post("/responses", json={**responses_body("plain"), "input": "x" * 70_000})),
    ]
    with httpx.Client(base_url=stack.url + "/v1", timeout=20) as anonymous:
        cases.append((401, anonymous.get("/models")))
        cases.append((401, anonymous.post("/chat/completions", json=chat_body("plain"))))
    for status, reply in cases:
        assert reply.status_code == status, reply.text
        assert_conforms("ErrorResponse", reply.json())


def test_former_deviations_are_gone(http: httpx.Client, fake: FakeDecoder) -> None:
    """system_fingerprint null, usage null before the end, request tools echoed unflattened:
    each once departed from the document; tools are where they showed."""
    fake.script = SCRIPTS["tools"]
    assert_conforms(
        "CreateChatCompletionResponse", post(http, "/chat/completions", chat_body("tools")).json()
    )
    fake.script = SCRIPTS["tools"]
    assert_conforms("Response", post(http, "/responses", responses_body("tools")).json())
    fake.script = SCRIPTS["tools"]
    reply = post(http, "/responses", responses_body("tools", stream=True))
    assert_conforms("ResponseCreatedEvent", json.loads(sse_events(reply.text)[0][1]))
