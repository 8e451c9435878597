"""Constraints through the DecoderEngine: the servicer's preparation (prompt + plan), the engine
applying `EngineRequest.constraints` while decoding, and the servicer's output processing.

Requests with different constraints run at the same time, so each one's mask must stay its own
inside a batch."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import jsonschema
import pytest
from prism.v1 import decoder_pb2

from services.decoder.engine import DecoderEngine, EngineRequest
from services.decoder.servicer import engine_options, prepare, to_proto
from services.decoder.structured import OutputDefaults, OutputProcessor
from shared.api import load
from shared.runtime import mlx_thread
from shared.runtime.loaded import LoadedModel
from shared.testing.fixtures import token_ids

SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "size": {"enum": ["S", "M", "L"]},
        "items": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99},
                  "maxItems": 4},
    },
    "required": ["ok", "size", "items"],
    "additionalProperties": False,
}  # fmt: skip
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 8}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


@pytest.fixture(scope="module")
def model(checkpoint_factory) -> LoadedModel:
    return mlx_thread.run_sync(load, checkpoint_factory("qwen3", "hf"), components=["language"])


@pytest.fixture(scope="module")
def engine(model: LoadedModel) -> Iterator[DecoderEngine]:
    engine = DecoderEngine(model, "tiny")
    engine.start()
    yield engine
    engine.shutdown()


def request(text: str, max_tokens: int = 200, **output) -> decoder_pb2.GenerateRequest:
    req = decoder_pb2.GenerateRequest(
        stop=decoder_pb2.StopConditions(max_tokens=max_tokens),
        output=decoder_pb2.OutputOptions(parse_reasoning=True, **output),
    )
    part = decoder_pb2.ContentPart(text=text)
    req.messages.messages.append(decoder_pb2.ChatMessage(role="user", content=[part]))
    req.messages.add_generation_prompt = True
    return req


async def run(engine: DecoderEngine, req: decoder_pb2.GenerateRequest, rid: str):
    """What DecoderServicer.Generate does, without gRPC."""
    prompt, features, plan = prepare(engine.model, req, {}, OutputDefaults(thinking_budget=4))
    fields = dict(request_id=rid, prompt=prompt, features=features, **engine_options(req))
    handle = engine.submit(EngineRequest(**fields, constraints=plan.constraints))
    post, events = OutputProcessor(plan), []
    async for event in handle:
        events += post.process(to_proto(event))
    deltas = [e.delta for e in events if e.HasField("delta")]
    return deltas, events[-1].finish


def json_request() -> decoder_pb2.GenerateRequest:
    fmt = decoder_pb2.ResponseFormat(
        type=decoder_pb2.ResponseFormat.TYPE_JSON_SCHEMA,
        json_schema=json.dumps(SCHEMA),
        strict=True,
    )
    return request("JSON please", response_format=fmt)


def tool_request() -> decoder_pb2.GenerateRequest:
    req = request("Weather?", tool_choice="get_weather", enable_thinking=False)
    req.messages.tools_json = json.dumps([WEATHER])
    return req


def test_constrained_requests_batched_together(engine: DecoderEngine) -> None:
    async def main():
        return await asyncio.gather(
            run(engine, json_request(), "json"),
            run(engine, tool_request(), "tool"),
            run(engine, request("Free text", max_tokens=16, enable_thinking=False), "free"),
        )

    (j_deltas, j_fin), (t_deltas, t_fin), (f_deltas, f_fin) = asyncio.run(main())
    # JSON: valid against the schema; reasoning (if the model opened <think>) kept apart.
    assert j_fin.reason == decoder_pb2.FINISH_REASON_STOP
    jsonschema.validate(json.loads("".join(d.text for d in j_deltas)), SCHEMA)
    # The forced call: one get_weather call whose arguments validate.
    assert t_fin.reason == decoder_pb2.FINISH_REASON_TOOL_CALLS
    calls = [tc for d in t_deltas for tc in d.tool_calls]
    assert calls[0].name == "get_weather" and {c.id for c in calls} == {calls[0].id}
    arguments = json.loads("".join(c.arguments for c in calls))
    jsonschema.validate(arguments, WEATHER["function"]["parameters"])
    # Unconstrained in the same batch: untouched by the others' masks.
    assert f_fin.usage.completion_tokens > 0 and not any(d.tool_calls for d in f_deltas)


def test_thinking_budget_in_the_engine(engine: DecoderEngine, model: LoadedModel) -> None:
    ids = token_ids("qwen3")
    prompt, _, _ = prepare(model, request("Think."), {}, OutputDefaults())
    req = decoder_pb2.GenerateRequest(
        tokens=decoder_pb2.TokenPrompt(token_ids=[*prompt.input_ids, ids["<think>"]]),
        stop=decoder_pb2.StopConditions(max_tokens=10),
        output=decoder_pb2.OutputOptions(parse_reasoning=True, thinking_budget=3),
    )
    deltas, finish = asyncio.run(run(engine, req, "think"))
    tokens = [t for d in deltas for t in d.token_ids]
    end = tokens.index(ids["</think>"]) if ids["</think>"] in tokens else len(tokens)
    assert end <= 3  # closed by the model or forced once 3 reasoning tokens were spent
    assert finish.usage.reasoning_tokens == end
    assert "</think>" not in "".join(d.text + d.reasoning_text for d in deltas)
