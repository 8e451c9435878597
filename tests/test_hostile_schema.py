"""Recursive and huge JSON schemas in `response_format` (issue #9): refused by the grammar
engine's limits with a 400, while the stack keeps serving.

Unit tests drive `services.decoder.grammar` with a real (tiny) tokenizer; the rest sends the
same schemas through a real stack (cache, decoder and gateway as processes, a tiny random
Qwen3), all at once, while /health is polled."""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from transformers import AutoTokenizer

from services.decoder import grammar
from services.decoder.grammar import GrammarConstraint
from services.launcher import Stack
from shared.errors import InvalidRequestError
from shared.testing.templates import QWEN2_5_TEMPLATE
from shared.testing.tokenizer import vocab_size, write_tokenizer
from tests.e2e_support import e2e_config

MODEL = "tiny-vl"  # e2e_config's served name


def nested(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


# name -> (schema, what the refusal says)
HOSTILE: dict[str, tuple[dict[str, Any], str]] = {
    "self reference": ({"$ref": "#"}, "admits no output"),
    "$defs cycle": (
        {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
        "admits no output",
    ),
    "anyOf cycle": ({"anyOf": [{"$ref": "#"}]}, "admits no output"),
    "cycle with siblings": ({"allOf": [{"$ref": "#"}], "type": "object"}, "circular"),
    "nested 100 levels": (nested(100), "recursion limit"),
    # 800 levels of JSON: past llguidance's limit, within what the gateway parses.
    "nested 400 levels": (nested(400), "recursion limit"),
    "20k properties": (
        {
            "type": "object",
            "properties": {f"p{i}": {"type": "integer"} for i in range(20_000)},
            "required": [f"p{i}" for i in range(20_000)],
        },
        "too large",
    ),
    "100k enum values": ({"enum": [f"v{i}" for i in range(100_000)]}, "too big"),
}
# Recursion as such is fine: a finite tree type is a legitimate schema.
TREE = {
    "type": "object",
    "properties": {
        "v": {"type": "integer"},
        "kids": {"type": "array", "items": {"$ref": "#"}, "maxItems": 2},
    },
    "required": ["v"],
    "additionalProperties": False,
}
SMALL = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}},
    "required": ["ok"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def llt(tmp_path_factory: pytest.TempPathFactory) -> Any:
    path: Path = tmp_path_factory.mktemp("qwen-tokenizer")
    write_tokenizer("qwen", path, QWEN2_5_TEMPLATE)
    tok = AutoTokenizer.from_pretrained(str(path))
    return grammar.llg_tokenizer(
        tok, vocab_size("qwen"), frozenset({tok.convert_tokens_to_ids("<|im_end|>")})
    )


@pytest.mark.parametrize("name", list(HOSTILE))
@pytest.mark.parametrize("strict", [True, False], ids=["strict", "lenient"])
def test_grammar_limits_refuse_hostile_schemas(llt: Any, name: str, strict: bool) -> None:
    schema, needle = HOSTILE[name]
    started = time.monotonic()
    with pytest.raises(InvalidRequestError) as info:
        GrammarConstraint(llt, grammar.json_schema_grammar(json.dumps(schema), strict=strict))
    assert info.value.param == "response_format"
    assert needle in info.value.message, info.value.message
    assert time.monotonic() - started < 10


def test_deeper_than_the_json_parser_is_a_400_not_a_crash() -> None:
    with pytest.raises(InvalidRequestError, match="nested too deeply"):
        grammar.json_schema_grammar("[" * 100_000 + "]" * 100_000)


def test_recursive_but_finite_schema_accepted(llt: Any) -> None:
    c = GrammarConstraint(llt, grammar.json_schema_grammar(TREE, strict=True))
    mask = c.allowed()
    assert mask is not None and mask.any() and not c.finished()


@pytest.fixture(scope="module")
def stack(checkpoint_factory: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    cfg = e2e_config(checkpoint_factory("qwen3", "hf"), tmp_path_factory.mktemp("hostile-schema"))
    cfg.with_encoder = False
    with Stack(cfg) as s:
        yield s


def structured(stack: Stack, schema: dict[str, Any], max_tokens: int = 24) -> httpx.Response:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Answer in JSON."}],
        "max_tokens": max_tokens,
        "enable_thinking": False,  # a random model would think until max_tokens
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "x", "schema": schema, "strict": True},
        },
    }
    return httpx.post(stack.base_url + "/chat/completions", json=body, timeout=120)


def test_hostile_schemas_refused_and_the_stack_stays_healthy(stack: Stack) -> None:
    stop, health = threading.Event(), []

    def poll_health() -> None:
        with httpx.Client(base_url=stack.gateway_url, timeout=10) as client:
            while not stop.is_set():
                health.append(client.get("/health").status_code)
                stop.wait(0.05)

    poller = threading.Thread(target=poll_health, daemon=True)
    poller.start()
    try:
        with concurrent.futures.ThreadPoolExecutor(len(HOSTILE)) as pool:
            futures = {name: pool.submit(structured, stack, s) for name, (s, _) in HOSTILE.items()}
            replies = {name: f.result() for name, f in futures.items()}
    finally:
        stop.set()
        poller.join(timeout=15)
    for name, r in replies.items():
        assert r.status_code == 400, (name, r.text)
        err = r.json()["error"]
        # The decoder names the field; its trailing metadata brings `param` back over gRPC.
        assert err["type"] == "invalid_request_error" and err["param"] == "response_format"
        assert HOSTILE[name][1] in err["message"], (name, err)
    assert health and set(health) == {200}, health
    # Still serving: ready, the decoder alive, a constrained request (recursive schema too)
    # answers, and its output parses.
    assert httpx.get(stack.gateway_url + "/ready", timeout=10).status_code == 200
    r = structured(stack, SMALL)
    assert r.status_code == 200, r.text
    assert json.loads(r.json()["choices"][0]["message"]["content"])["ok"] in (True, False)
    assert structured(stack, TREE, max_tokens=8).status_code == 200
