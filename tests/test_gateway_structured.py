"""The gateway's side of structured outputs, reasoning and tool calls, against a fake decoder
that streams scripted events; driven by the official openai client."""

from __future__ import annotations

import json

import openai
import pytest
from prism.v1 import common_pb2, decoder_pb2

from services.gateway.testing import FakeDecoder, FakeServer, FakeStack, model_info

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
]


def delta(text: str = "", reasoning: str = "", calls: tuple = ()) -> decoder_pb2.GenerateResponse:
    tcs = [decoder_pb2.ToolCall(id=i, name=n, arguments=a) for i, n, a in calls]
    d = decoder_pb2.Delta(text=text, reasoning_text=reasoning, tool_calls=tcs, token_ids=[1])
    return decoder_pb2.GenerateResponse(delta=d)


def finish(reason: int = decoder_pb2.FINISH_REASON_STOP) -> decoder_pb2.GenerateResponse:
    usage = common_pb2.Usage(prompt_tokens=5, completion_tokens=7, reasoning_tokens=2)
    return decoder_pb2.GenerateResponse(finish=decoder_pb2.Finish(reason=reason, usage=usage))


THOUGHT_THEN_CALL = [
    delta(reasoning="Need "),
    delta(reasoning="weather."),
    delta(calls=[("call_1", "get_weather", "")]),
    delta(calls=[("call_1", "", '{"city": ')]),
    delta(calls=[("call_1", "", '"Paris"}')]),
    finish(decoder_pb2.FINISH_REASON_TOOL_CALLS),
]
THOUGHT_THEN_TEXT = [delta(reasoning="Hmm."), delta(text='{"a": '), delta(text="1}"), finish()]


@pytest.fixture(scope="module")
def stack():
    decoder = FakeServer(FakeDecoder("d0", [model_info("txt", ("text",))]))
    s = FakeStack([], [decoder])
    yield s
    s.stop()


@pytest.fixture
def fake(stack) -> FakeDecoder:
    servicer = stack.decoders[0].servicer
    yield servicer
    servicer.script = None


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=stack.url + "/v1", api_key="x", max_retries=0, timeout=20)


def test_chat_request_fields_reach_the_decoder(client, fake):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    client.chat.completions.create(
        model="txt",
        messages=[
            {"role": "user", "content": "weather?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        ],  # fmt: skip
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "x", "schema": schema, "strict": True},
        },  # fmt: skip
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        extra_body={
            "enable_thinking": False,
            "thinking_budget": 64,
            "chat_template_kwargs": {"custom": 1},
        },  # fmt: skip
    )
    req = fake.requests[-1]
    fmt = req.output.response_format
    assert fmt.type == decoder_pb2.ResponseFormat.TYPE_JSON_SCHEMA and fmt.strict
    assert json.loads(fmt.json_schema) == schema
    assert req.output.tool_choice == "get_weather" and req.output.parse_reasoning
    assert req.output.HasField("enable_thinking") and not req.output.enable_thinking
    assert req.output.thinking_budget == 64
    assert json.loads(req.messages.chat_template_kwargs_json) == {"custom": 1}
    assert json.loads(req.messages.tools_json)[0]["function"]["name"] == "get_weather"
    assistant, tool = req.messages.messages[1], req.messages.messages[2]
    assert json.loads(assistant.tool_calls_json)[0]["id"] == "c1"
    assert tool.role == "tool" and tool.tool_call_id == "c1" and tool.content[0].text == "sunny"


def test_chat_reasoning_and_tool_calls(client, fake):
    fake.script = THOUGHT_THEN_CALL
    out = client.chat.completions.create(
        model="txt", messages=[{"role": "user", "content": "x"}], tools=TOOLS
    )
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.model_extra["reasoning_content"] == "Need weather."
    [call] = choice.message.tool_calls
    assert (call.id, call.type, call.function.name) == ("call_1", "function", "get_weather")
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert out.usage.completion_tokens_details.reasoning_tokens == 2


def test_chat_stream_reasoning_and_tool_call_deltas(client, fake):
    fake.script = THOUGHT_THEN_CALL
    chunks = list(
        client.chat.completions.create(
            model="txt", messages=[{"role": "user", "content": "x"}], tools=TOOLS, stream=True
        )
    )
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas)
    assert reasoning == "Need weather."
    pieces = [tc for d in deltas for tc in d.tool_calls or []]
    assert pieces[0].index == 0 and pieces[0].id == "call_1" and pieces[0].type == "function"
    assert pieces[0].function.name == "get_weather"
    assert all(p.index == 0 and p.id is None for p in pieces[1:])
    assert "".join(p.function.arguments or "" for p in pieces) == '{"city": "Paris"}'
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_responses_text_format_and_reasoning_item(client, fake):
    fake.script = THOUGHT_THEN_TEXT
    r = client.responses.create(
        model="txt",
        input="x",
        text={"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}},
    )
    req = fake.requests[-1]
    assert req.output.response_format.type == decoder_pb2.ResponseFormat.TYPE_JSON_SCHEMA
    assert [item.type for item in r.output] == ["reasoning", "message"]
    assert r.output[0].content[0].text == "Hmm." and json.loads(r.output_text) == {"a": 1}
    assert r.usage.output_tokens_details.reasoning_tokens == 2


def test_responses_stream_reasoning_then_text(client, fake):
    fake.script = THOUGHT_THEN_TEXT
    events = list(client.responses.create(model="txt", input="x", stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds.index("response.reasoning_text.delta") < kinds.index("response.output_text.delta")
    added = [e for e in events if e.type == "response.output_item.added"]
    assert [(e.output_index, e.item.type) for e in added] == [(0, "reasoning"), (1, "message")]
    final = events[-1].response
    assert events[-1].type == "response.completed"
    assert [i.type for i in final.output] == ["reasoning", "message"]
    assert final.output[1].id == added[1].item.id and final.output_text == '{"a": 1}'


def test_responses_stream_tool_calls_only(client, fake):
    fake.script = THOUGHT_THEN_CALL
    events = list(
        client.responses.create(
            model="txt",
            input="x",
            stream=True,
            tools=[{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}],
            tool_choice="required",
        )  # fmt: skip
    )
    assert fake.requests[-1].output.tool_choice == "required"
    final = events[-1].response
    assert [i.type for i in final.output] == ["reasoning", "function_call"]
    call = final.output[1]
    assert call.call_id == "call_1" and json.loads(call.arguments) == {"city": "Paris"}
    done = [e.output_index for e in events if e.type == "response.output_item.done"]
    assert done == [0, 1]


def test_chat_stream_two_pieces_of_one_call_in_one_delta(client, fake):
    # Each piece's delta must carry only its own arguments (not the accumulated ones).
    fake.script = [
        delta(calls=[("call_9", "get_weather", '{"a"'), ("call_9", "", ": 1}")]),
        finish(decoder_pb2.FINISH_REASON_TOOL_CALLS),
    ]
    chunks = list(
        client.chat.completions.create(
            model="txt", messages=[{"role": "user", "content": "x"}], tools=TOOLS, stream=True
        )
    )
    pieces = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert "".join(p.function.arguments or "" for p in pieces) == '{"a": 1}'


def test_bad_reasoning_fields_are_400(client):
    for extra in ({"thinking_budget": -1}, {"enable_thinking": "maybe"}):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(
                model="txt", messages=[{"role": "user", "content": "x"}], extra_body=extra
            )
