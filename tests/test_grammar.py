"""Grammar constraints (llguidance) driven by a fake model that samples anything the mask allows.

A random sampler over the allowed tokens is the harshest model there is: whatever it produces
must still parse and validate. Its weights lean towards tokens that close strings and
structures, so documents end in a few hundred steps instead of growing forever.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from transformers import AutoTokenizer

from services.decoder import grammar
from services.decoder.grammar import GrammarConstraint
from services.decoder.tools import ToolCallParser, merge_calls, tool_call_grammar
from shared.errors import InvalidRequestError
from shared.testing.templates import QWEN2_5_TEMPLATE
from shared.testing.tokenizer import vocab_size, write_tokenizer

NESTED = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "address"],
    "additionalProperties": False,
}
ENUM = {
    "type": "object",
    "properties": {
        "colour": {"enum": ["red", "green", "blue"]},
        "size": {"type": "string", "enum": ["S", "M", "L", "XL"]},
        "ok": {"type": "boolean"},
    },
    "required": ["colour", "size", "ok"],
    "additionalProperties": False,
}
ARRAY = {
    "type": "object",
    "properties": {
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 4},
        "points": {
            "type": "array",
            "minItems": 1,
            "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
                "required": ["x", "y"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["tags", "points"],
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
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    path: Path = tmp_path_factory.mktemp("qwen-tokenizer")
    write_tokenizer("qwen", path, QWEN2_5_TEMPLATE)
    return AutoTokenizer.from_pretrained(str(path))


@pytest.fixture(scope="module")
def eos(hf_tokenizer) -> frozenset[int]:
    return frozenset({hf_tokenizer.convert_tokens_to_ids("<|im_end|>")})


@pytest.fixture(scope="module")
def llt(hf_tokenizer, eos):
    return grammar.llg_tokenizer(hf_tokenizer, vocab_size("qwen"), eos)


def drive(c: GrammarConstraint, tok, eos: frozenset[int], seed: int, steps: int = 600) -> str:
    """Sample from the mask until the constraint finishes or an EOS comes; return the text."""
    rng = np.random.default_rng(seed)
    pieces = [tok.decode([i]) for i in range(len(tok))]
    closing = np.array([any(ch in p for ch in '"]},') for p in pieces] + [False] * 200)
    out: list[int] = []
    for _ in range(steps):
        if c.finished():
            break
        mask = c.allowed()
        assert mask is not None and mask.dtype == bool and mask.shape[0] >= len(tok)
        ids = np.flatnonzero(mask)
        weights = 1.0 + 30.0 * closing[ids] + 500.0 * np.isin(ids, list(eos))
        token = int(rng.choice(ids, p=weights / weights.sum()))
        if token in eos:
            break
        c.accept(token)
        out.append(token)
    else:
        pytest.fail("the document did not end")
    return tok.decode(out)


@pytest.mark.parametrize("schema", [NESTED, ENUM, ARRAY], ids=["nested", "enum", "array"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_json_schema_output_validates(schema, seed, llt, hf_tokenizer, eos):
    c = GrammarConstraint(llt, grammar.json_schema_grammar(json.dumps(schema), strict=True))
    text = drive(c, hf_tokenizer, eos, seed)
    jsonschema.validate(json.loads(text), schema)


def test_json_object_is_any_object(llt, hf_tokenizer, eos):
    for seed in range(3):
        c = GrammarConstraint(llt, grammar.json_object_grammar())
        assert isinstance(json.loads(drive(c, hf_tokenizer, eos, seed)), dict)


def test_finished_when_only_eos_is_left(llt, hf_tokenizer, eos):
    c = GrammarConstraint(llt, grammar.json_schema_grammar({"enum": ["yes"]}))
    assert not c.finished()
    for token in hf_tokenizer.encode('"yes"', add_special_tokens=False):
        assert c.allowed()[token]
        c.accept(token)
    assert c.finished()  # only an EOS could follow: the engine may stop without sampling it
    assert set(np.flatnonzero(c.allowed())) <= set(eos)


@pytest.mark.parametrize(
    "schema",
    [{"type": "strin"}, {"$ref": "#/nope"}, {"type": "integer", "minimum": 5, "maximum": 2},
     {"not": {"type": "string"}}, {"type": "string", "pattern": "(?<=a)b"}],
)  # fmt: skip
def test_refused_schema_is_invalid_request(schema, llt):
    with pytest.raises(InvalidRequestError) as info:
        GrammarConstraint(llt, grammar.json_schema_grammar(schema, strict=True))
    assert info.value.param == "response_format" and "refused" in info.value.message


def test_non_strict_ignores_what_it_cannot_enforce(llt):
    GrammarConstraint(llt, grammar.json_schema_grammar({"not": {"type": "string"}}, strict=False))
    with pytest.raises(InvalidRequestError, match="not valid JSON"):
        grammar.json_schema_grammar("{nope", strict=True)


def test_tokenizer_is_cached(hf_tokenizer, eos, llt):
    assert grammar.llg_tokenizer(hf_tokenizer, vocab_size("qwen"), eos) is llt


def _ids(tok) -> tuple[int, int]:
    return tok.convert_tokens_to_ids("<tool_call>"), tok.convert_tokens_to_ids("</tool_call>")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_named_tool_grammar_gives_a_parsable_call(seed, llt, hf_tokenizer, eos):
    lark = tool_call_grammar([TIME, WEATHER], "get_weather", *_ids(hf_tokenizer),
                             json_options=grammar.JSON_OPTIONS)  # fmt: skip
    c = GrammarConstraint(llt, grammar.lark_grammar(lark), param="tool_choice")
    text = drive(c, hf_tokenizer, eos, seed)
    assert text.startswith('<tool_call>\n{"name": "get_weather", "arguments": {')
    parser = ToolCallParser()
    content, pieces = parser.feed(text)
    rest, more = parser.flush()
    calls = merge_calls(pieces + more)
    assert (
        (content + rest).strip() == "" and calls and {c["name"] for c in calls} == {"get_weather"}
    )
    for call in calls:
        jsonschema.validate(json.loads(call["arguments"]), WEATHER["function"]["parameters"])


def test_required_tool_grammar_allows_any_tool(llt, hf_tokenizer, eos):
    names = set()
    for seed in range(6):
        lark = tool_call_grammar([TIME, WEATHER], "required", *_ids(hf_tokenizer))
        text = drive(GrammarConstraint(llt, grammar.lark_grammar(lark)), hf_tokenizer, eos, seed)
        parser = ToolCallParser()
        _, pieces = parser.feed(text)
        calls = merge_calls(pieces + parser.flush()[1])
        assert calls
        names |= {c["name"] for c in calls}
    assert names <= {"get_time", "get_weather"}


def test_tool_grammar_refuses_unknown_function(hf_tokenizer):
    with pytest.raises(InvalidRequestError, match="not among the tools"):
        tool_call_grammar([WEATHER], "nope", *_ids(hf_tokenizer))
