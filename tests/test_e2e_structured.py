"""Structured outputs, forced tool calls and reasoning through the whole stack (cache, decoder,
gateway as processes) with the official openai client, on a tiny random Qwen3 whose template
has both tools and <think>. A random model is the harshest test of the grammar: whatever it
emits must still parse and validate."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import openai
import pytest

from services.launcher import Stack
from tests.e2e_support import e2e_config

MODEL = "tiny-vl"  # e2e_config's served name
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "size": {"enum": ["S", "M", "L"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
        "dims": {
            "type": "object",
            "properties": {
                "w": {"type": "integer", "maximum": 999},
                "h": {"type": "integer", "minimum": -9, "maximum": 9},
            },
            "required": ["w", "h"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "size", "tags", "dims"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 10},
                "unit": {"enum": ["c", "f"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
MESSAGES = [{"role": "user", "content": "Describe the box as JSON."}]
FORMAT = {"type": "json_schema", "json_schema": {"name": "box", "schema": SCHEMA, "strict": True}}


@pytest.fixture(scope="module")
def client(checkpoint_factory: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    cfg = e2e_config(checkpoint_factory("qwen3", "hf"), tmp_path_factory.mktemp("e2e-structured"))
    cfg.with_encoder = False
    cfg.decoder_args = ["--thinking-budget", "6"]  # a random model would think forever
    with Stack(cfg) as stack:
        yield openai.OpenAI(base_url=stack.base_url, api_key="unused", max_retries=0, timeout=120)


def test_chat_json_schema_validates(client: openai.OpenAI) -> None:
    for seed in range(2):
        reply = client.chat.completions.create(
            model=MODEL, messages=MESSAGES, response_format=FORMAT, max_tokens=300,
            temperature=1.0, seed=seed,
        )  # fmt: skip
        msg = reply.choices[0].message
        assert reply.choices[0].finish_reason == "stop", msg
        jsonschema.validate(json.loads(msg.content), SCHEMA)
        assert "<think>" not in msg.content and "</think>" not in msg.content


def test_chat_json_schema_streamed(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            response_format=FORMAT,
            max_tokens=300,
            stream=True,
            extra_body={"enable_thinking": False},
        )  # fmt: skip
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), SCHEMA)


def test_refused_schema_is_a_400(client: openai.OpenAI) -> None:
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}
    with pytest.raises(openai.BadRequestError, match="refused"):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, response_format=bad)


def test_named_tool_choice_returns_tool_calls(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=200,
    )  # fmt: skip
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    # The conversation goes on with the call and its result.
    follow = client.chat.completions.create(
        model=MODEL, max_tokens=4,
        messages=[{"role": "user", "content": "Weather in Paris?"},
                  {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                  {"role": "tool", "tool_call_id": call.id, "content": "sunny"}],
    )  # fmt: skip
    assert follow.choices[0].finish_reason in ("stop", "length")


def test_required_tool_choice_streams_tool_call_deltas(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Weather?"}],
            tools=[WEATHER],
            tool_choice="required",
            max_tokens=300,
            stream=True,
        )  # fmt: skip
    )
    pieces = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert pieces and pieces[0].function.name == "get_weather" and pieces[0].id
    first = [p for p in pieces if p.index == 0]
    args = "".join(p.function.arguments or "" for p in first)
    jsonschema.validate(json.loads(args), WEATHER["function"]["parameters"])
    assert chunks[-1].choices[0].finish_reason in ("tool_calls", "length")


def test_responses_text_format_json_object(client: openai.OpenAI) -> None:
    r = client.responses.create(
        model=MODEL, input="A JSON object please.", max_output_tokens=200,
        text={"format": {"type": "json_object"}},
    )  # fmt: skip
    assert r.status == "completed"
    assert isinstance(json.loads(r.output_text), dict)
    for item in r.output:
        if item.type == "reasoning":  # the budget closed it: its text is apart from the answer
            assert "</think>" not in item.content[0].text
