"""Reasoning and tool calls: the streaming splitter and parser on awkward chunk boundaries, the
thinking budget, and the servicer's request -> constraints -> output path on tiny real models.

`constrained_generate` applies the constraints the way the engine does (mask before sampling,
accept after, stop when one finishes), so these tests do not depend on the engine's internals.
"""

from __future__ import annotations

import json
import random

import jsonschema
import mlx.core as mx
import numpy as np
import pytest
from prism.v1 import decoder_pb2

from services.decoder.reasoning import ReasoningSplitter, ThinkingBudget, ThinkingTokens
from services.decoder.servicer import prepare
from services.decoder.structured import OutputDefaults, OutputProcessor, template_kwargs
from services.decoder.tools import ToolCallParser, merge_calls
from shared.api import load
from shared.runtime import mlx_thread
from shared.runtime.generate import prefill, prepare_inputs
from shared.runtime.loaded import LoadedModel
from shared.testing.fixtures import token_ids

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "days": {"type": "integer"},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
CALL = (
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa}ris", "n": {"a": [1]}}}'
    "\n</tool_call>"
)


def chunked(text: str, seed: int) -> list[str]:
    rng, out, i = random.Random(seed), [], 0
    while i < len(text):
        n = rng.randint(1, 5)
        out.append(text[i : i + n])
        i += n
    return out


def parse(pieces: list[str]) -> tuple[str, list[dict[str, str]], int]:
    parser, content, calls = ToolCallParser(), "", []
    for p in pieces:
        c, t = parser.feed(p)
        content, calls = content + c, calls + t
    c, t = parser.flush()
    return content + c, merge_calls(calls + t), len(calls + t)


@pytest.mark.parametrize("seed", range(8))
def test_tool_call_parser_on_awkward_chunks(seed):
    text = f"Let me check.\n\n{CALL}\n" + CALL.replace("get_weather", "other") + "\n"
    content, calls, n_pieces = parse(chunked(text, seed))
    assert content == "Let me check."
    assert [c["name"] for c in calls] == ["get_weather", "other"]
    assert all(json.loads(c["arguments"]) == {"city": "Pa}ris", "n": {"a": [1]}} for c in calls)
    assert all(c["id"].startswith("call_") for c in calls) and calls[0]["id"] != calls[1]["id"]
    assert n_pieces > 2  # the name went out first, then the arguments in pieces


def test_tool_call_parser_other_shapes():
    # Keys in another order: the whole call at once; text after the calls is content.
    content, calls, _ = parse(['<tool_call>\n{"arguments": {}, "name": "f"}\n</tool_call> ok'])
    assert content == "ok" and calls[0]["name"] == "f" and calls[0]["arguments"] == "{}"
    # Not JSON: given back as text. An unterminated call that parses still counts.
    content, calls, _ = parse(["<tool_call>\nnope\n</tool_call>"])
    assert calls == [] and content == "<tool_call>\nnope\n</tool_call>"
    content, calls, _ = parse(['<tool_call>\n{"name": "f", "arguments": {"x": 1}}'])
    assert calls[0]["arguments"] == '{"x": 1}' and content == ""
    assert parse(["no calls <tool", " here\n"])[:2] == ("no calls <tool here\n", [])


THINK = ThinkingTokens(start_id=1, end_id=2)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("in_thinking", [False, True])
def test_reasoning_splitter(seed, in_thinking):
    text = "I think\n\nhard.\n</think>\n\nThe answer\n is 4.\n"
    if not in_thinking:
        text = "<think>\n" + text
    s, reasoning, content = ReasoningSplitter(THINK, in_thinking=in_thinking), "", ""
    for piece in chunked(text, seed):
        r, c = s.feed(piece)
        reasoning, content = reasoning + r, content + c
    r, c = s.flush()
    assert (reasoning + r, content + c) == ("I think\n\nhard.", "The answer\n is 4.\n")
    plain = ReasoningSplitter(THINK, in_thinking=False)
    assert plain.feed("no <thin") == ("", "no ") and plain.feed("king") == ("", "<thinking")


def test_thinking_budget_forces_the_end_token():
    budget = ThinkingBudget(THINK, 3, vocab_size=10, in_thinking=False)
    assert budget.allowed() is None
    for t in (1, 5, 6, 7):  # <think> opens the block, then three reasoning tokens
        budget.accept(t)
    assert list(np.flatnonzero(budget.allowed())) == [THINK.end_id]
    budget.accept(THINK.end_id)
    assert budget.allowed() is None and not budget.finished()


# ---- through the servicer's preparation, on tiny real checkpoints -------------------------


def constrained_generate(model: LoadedModel, prompt_ids: list[int], constraints: list, n: int):
    """Greedy decoding with the constraints' masks (AND-ed), as the engine applies them."""
    lm = model.language
    assert lm is not None
    cache = lm.make_cache()
    logits = prefill(lm, prepare_inputs(model, _prompt(prompt_ids), []), cache)
    tokens: list[int] = []
    for _ in range(n):
        masks = [m for m in (c.allowed() for c in constraints) if m is not None]
        row = np.array(logits[0].astype(mx.float32))
        for m in masks:
            row = np.where(m[: row.shape[0]], row, -np.inf)
        token = int(row.argmax())
        for c in constraints:
            c.accept(token)
        tokens.append(token)
        if token in model.eos_token_ids or any(c.finished() for c in constraints):
            break
        logits = lm(mx.array([[token]]), cache)[:, -1, :]
    return tokens


def _prompt(ids: list[int]):
    from shared.media.types import ProcessedPrompt

    return ProcessedPrompt(input_ids=ids)


def run_request(model: LoadedModel, req: decoder_pb2.GenerateRequest, n: int = 80, **defaults):
    """prepare (prompt + plan) -> constrained greedy decoding -> OutputProcessor events."""
    prompt, _, plan = prepare(model, req, {}, OutputDefaults(**defaults))
    tokens = mlx_thread.run_sync(constrained_generate, model, prompt.input_ids, plan.constraints, n)
    post, events = OutputProcessor(plan), []
    ends = model.eos_token_ids
    for t in tokens:
        text = "" if t in ends else model.tokenizer.decode([t])
        ev = decoder_pb2.GenerateResponse(delta=decoder_pb2.Delta(text=text, token_ids=[t]))
        events += post.process(ev)
    reason = decoder_pb2.FINISH_REASON_STOP if len(tokens) < n else decoder_pb2.FINISH_REASON_LENGTH
    events += post.process(decoder_pb2.GenerateResponse(finish=decoder_pb2.Finish(reason=reason)))
    return prompt, tokens, events


def chat(text: str, **output) -> decoder_pb2.GenerateRequest:
    msg = decoder_pb2.ChatMessage(role="user", content=[decoder_pb2.ContentPart(text=text)])
    req = decoder_pb2.GenerateRequest(output=decoder_pb2.OutputOptions(**output))
    req.messages.messages.append(msg)
    req.messages.add_generation_prompt = True
    return req


@pytest.fixture(scope="module")
def qwen2(checkpoint_factory) -> LoadedModel:
    return mlx_thread.run_sync(load, checkpoint_factory("qwen2", "hf"), components=["language"])


@pytest.fixture(scope="module")
def qwen3(checkpoint_factory) -> LoadedModel:
    return mlx_thread.run_sync(load, checkpoint_factory("qwen3", "hf"), components=["language"])


def test_forced_tool_call_on_tiny_qwen2(qwen2):
    req = chat("Weather in Paris for 3 days?", tool_choice="get_weather")
    req.messages.tools_json = json.dumps([WEATHER])
    prompt, tokens, events = run_request(qwen2, req, n=120)
    assert "<tools>" in qwen2.tokenizer.decode(prompt.input_ids)  # the template saw the tools
    calls = merge_calls([tc for e in events if e.HasField("delta") for tc in e.delta.tool_calls])
    assert len(calls) >= 1 and calls[0]["name"] == "get_weather"
    jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER["function"]["parameters"])
    assert "".join(e.delta.text for e in events if e.HasField("delta")) == ""
    assert events[-1].finish.reason == decoder_pb2.FINISH_REASON_TOOL_CALLS


def test_json_schema_on_tiny_qwen2(qwen2):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"},
              "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
              "required": ["ok", "tags"], "additionalProperties": False}  # fmt: skip
    fmt = decoder_pb2.ResponseFormat(
        type=decoder_pb2.ResponseFormat.TYPE_JSON_SCHEMA,
        json_schema=json.dumps(schema),
        strict=True,
    )
    _, tokens, events = run_request(qwen2, chat("JSON please", response_format=fmt), n=60)
    text = "".join(e.delta.text for e in events if e.HasField("delta"))
    jsonschema.validate(json.loads(text), schema)
    assert events[-1].finish.reason == decoder_pb2.FINISH_REASON_STOP


def test_template_kwargs_precedence():
    req = chat("x")
    assert template_kwargs(req, OutputDefaults()) == {}
    assert template_kwargs(req, OutputDefaults(enable_thinking=False)) == {"enable_thinking": False}
    req.messages.chat_template_kwargs_json = json.dumps({"enable_thinking": True, "k": 1})
    assert template_kwargs(req, OutputDefaults(enable_thinking=False))["enable_thinking"] is True
    req.output.enable_thinking = False  # the request's own field wins over its template kwargs
    assert template_kwargs(req, OutputDefaults()) == {"enable_thinking": False, "k": 1}


def test_thinking_budget_on_tiny_qwen3(qwen3):
    ids = token_ids("qwen3")
    # A prompt that ends inside <think> (templates that open the block themselves).
    chat_prompt, _, _ = prepare(qwen3, chat("Think first."), {}, OutputDefaults())
    opened = [*chat_prompt.input_ids, ids["<think>"], *qwen3.tokenizer.encode("\n")]
    req = decoder_pb2.GenerateRequest(
        tokens=decoder_pb2.TokenPrompt(token_ids=opened),
        output=decoder_pb2.OutputOptions(parse_reasoning=True, thinking_budget=5),
    )
    _, tokens, events = run_request(qwen3, req, n=12)
    end = tokens.index(ids["</think>"]) if ids["</think>"] in tokens else len(tokens)
    assert end <= 5 or tokens[5] == ids["</think>"]  # forced exactly when the budget ran out
    deltas = [e.delta for e in events if e.HasField("delta")]
    reasoning = "".join(d.reasoning_text for d in deltas)
    assert reasoning == qwen3.tokenizer.decode(tokens[:end]).strip("\n")
    assert "</think>" not in "".join(d.text for d in deltas)
    assert events[-1].finish.usage.reasoning_tokens == end


def test_thinking_off_and_on_with_tiny_qwen3(qwen3):
    # enable_thinking=False: Qwen3's template closes an empty block; nothing is reasoning.
    req = chat("Hi", parse_reasoning=True, enable_thinking=False, thinking_budget=3)
    prompt, _, plan = prepare(qwen3, req, {}, OutputDefaults())
    assert qwen3.tokenizer.decode(prompt.input_ids).endswith("<think>\n\n</think>\n\n")
    assert plan.constraints == [] and not plan.in_thinking
    # Thinking on (the template default): the model may open <think>, so the budget applies,
    # and a grammar lets <think> through as the first token.
    fmt = decoder_pb2.ResponseFormat(type=decoder_pb2.ResponseFormat.TYPE_JSON_OBJECT)
    req = chat("Hi", parse_reasoning=True, thinking_budget=3, response_format=fmt)
    _, _, plan = prepare(qwen3, req, {}, OutputDefaults())
    budget, gated = plan.constraints
    assert isinstance(budget, ThinkingBudget) and gated.allowed()[token_ids("qwen3")["<think>"]]


def test_thinking_markers_are_configurable(checkpoint_factory):
    import argparse

    from services.decoder.reasoning import add_flags, defaults_from_args, thinking_tokens
    from shared.api import load

    tokenizer = load(checkpoint_factory("qwen3", "hf"), components=["language"]).tokenizer
    vocab = tokenizer.get_vocab()
    # Any pair of single tokens can mark reasoning; here the tool-call markers stand in.
    marks = thinking_tokens(tokenizer, "<tool_call>", "</tool_call>")
    assert marks == ThinkingTokens(
        vocab["<tool_call>"], vocab["</tool_call>"], "<tool_call>", "</tool_call>"
    )
    assert thinking_tokens(tokenizer, "<reason>", "</reason>") is None
    parser = argparse.ArgumentParser()
    add_flags(parser)
    args = parser.parse_args(["--reasoning-parser", "qwen3", "--thinking-start-token", "<reason>"])
    with pytest.raises(ValueError, match="<reason>"):
        defaults_from_args(args, tokenizer)
    ok = parser.parse_args(["--thinking-end-token", "</tool_call>"])
    assert defaults_from_args(ok, tokenizer).thinking_end_token == "</tool_call>"
