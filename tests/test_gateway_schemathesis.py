"""schemathesis against the gateway's own OpenAPI document (issue #9).

The app (services.gateway.app.create_app, with an API key) runs in-process through schemathesis's
ASGI transport, in front of fake gRPC encoder/decoder servers (services.gateway.testing). Every
`/v1` operation is exercised with positive (schema-valid) and negative (schema-violating) data
from schemathesis's examples, coverage and fuzzing phases; each response must pass
not_a_server_error (no 5xx), status_code_conformance (a declared status),
content_type_conformance and response_schema_conformance (the JSON body, or every Server-Sent
Event of a stream with its `data` parsed as JSON, matches the declared schema). The unprefixed
aliases are the same handlers and are left out to keep the run short.

Deterministic and bounded: Hypothesis derandomized with a fixed seed, no example database,
MAX_EXAMPLES per operation and mode. Half of the positive chat/responses cases ask for a served
model (picked from a digest of the case, so reruns pick the same): a random model name only
ever reaches the 404, and the answers and streams need a model that exists.
"""

from __future__ import annotations

import collections
import copy
import hashlib
import json
from collections.abc import Callable, Iterator
from typing import Any

import hypothesis
import pytest

schemathesis = pytest.importorskip("schemathesis")

from schemathesis.core.failures import FailureGroup  # noqa: E402
from schemathesis.specs.openapi import checks as openapi_checks  # noqa: E402

from services.gateway.app import create_app  # noqa: E402
from services.gateway.config import GatewayConfig  # noqa: E402
from services.gateway.messages import ROLES  # noqa: E402
from services.gateway.openapi_doc import CHAT_EXAMPLES, DEMO_MODEL, RESPONSE_EXAMPLES  # noqa: E402
from services.gateway.schemas import CHAT_ROLES  # noqa: E402
from services.gateway.testing import FakeDecoder, FakeEncoder, FakeServer, model_info  # noqa: E402

KEY = "sk-schemathesis"
MODELS = (DEMO_MODEL, "txt")  # the request examples in the document name DEMO_MODEL
MAX_EXAMPLES = 40
SEED = 20240909
CHECKS = [
    schemathesis.checks.not_a_server_error,
    openapi_checks.status_code_conformance,
    openapi_checks.content_type_conformance,
    openapi_checks.response_schema_conformance,
]
Body = Any


# --- the app and the document ------------------------------------------------------------------


@pytest.fixture(scope="module")
def backends() -> Iterator[tuple[FakeServer, FakeServer]]:
    models = [model_info(DEMO_MODEL, ("text", "image", "video")), model_info("txt", ("text",))]
    encoder = FakeServer(FakeEncoder([models[0]]))
    decoder = FakeServer(FakeDecoder("d0", models))
    yield encoder, decoder
    encoder.stop()
    decoder.stop()


@pytest.fixture
def app(backends: tuple[FakeServer, FakeServer]) -> Any:
    """A fresh gateway per operation: schemathesis ends the ASGI lifespan after each test, and
    the gateway's backend pools (like any server process's) start only once."""
    encoder, decoder = backends
    config = GatewayConfig(
        encoders=[encoder.address],
        decoders=[decoder.address],
        api_key=KEY,
        health_interval=0.2,
        fetch_timeout=1.0,  # media URLs schemathesis invents never reach the network
        max_body_bytes=256 * 1024,
        request_timeout=10.0,
    )
    return create_app(config)


def document() -> dict[str, Any]:
    """The gateway's OpenAPI document. Building it starts nothing and contacts no backend."""
    return create_app(GatewayConfig(decoders=["127.0.0.1:9"], api_key=KEY)).openapi()


def load(doc: dict[str, Any]) -> Any:
    config = schemathesis.Config.from_dict(
        {
            "seed": SEED,
            "headers": {"Authorization": f"Bearer {KEY}"},
            "generation": {
                "mode": "all",
                "max-examples": MAX_EXAMPLES,
                "deterministic": True,
                "database": "none",
            },
            "phases": {"stateful": {"enabled": False}},
        }
    )
    loaded = schemathesis.openapi.from_dict(doc, config=config).include(path_regex=r"^/v1/")
    # Selects the in-process ASGI transport; every call names the app it goes to (`app=`).
    loaded.app = create_app(GatewayConfig(decoders=["127.0.0.1:9"]))
    return loaded


schema = load(document())
SEEN: collections.Counter[tuple[str, int, str]] = collections.Counter()


def _served_model(case: Any) -> None:
    body = case.body
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        return
    if case.meta is None or not case.meta.generation.mode.is_positive:
        return
    digest = hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).digest()
    if digest[0] % 2:
        body["model"] = MODELS[digest[1] % len(MODELS)]


@schema.parametrize()
# `app` is per operation (one pytest item), shared by that operation's examples on purpose.
@hypothesis.settings(suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture])
def test_gateway_conforms_to_its_openapi(case: Any, app: Any) -> None:
    _served_model(case)
    response = case.call_and_validate(checks=CHECKS, app=app)
    media = response.headers.get("content-type", [""])[0].split(";")[0]
    SEEN[(case.operation.path, response.status_code, media)] += 1


def test_run_reached_answers_and_streams() -> None:
    """The run above is not vacuous: both generation routes answered, streamed and refused."""
    if not SEEN:
        pytest.skip("runs after test_gateway_conforms_to_its_openapi only")
    for path in ("/v1/chat/completions", "/v1/responses"):
        assert SEEN[(path, 200, "application/json")] > 0, SEEN
        assert SEEN[(path, 200, "text/event-stream")] > 0, SEEN
        assert SEEN[(path, 400, "application/json")] > 0, SEEN
        assert SEEN[(path, 401, "application/json")] > 0, SEEN


def test_document_states_what_the_handlers_accept() -> None:
    assert set(CHAT_ROLES) == ROLES
    doc = document()
    for path, operation in doc["paths"].items():
        for method, spec in operation.items():
            assert "200" in spec["responses"], f"{method} {path}"
            if path.rstrip("/").endswith("health"):
                continue
            assert spec.get("security") == [{"bearer": []}], f"{method} {path}"
            for code in ("401", "500"):
                error = spec["responses"][code]["content"]["application/json"]["schema"]
                assert error == {"$ref": "#/components/schemas/ErrorResponse"}


# --- the checks bite ---------------------------------------------------------------------------


def _call(doc: dict[str, Any], app: Any, path: str, body: dict[str, Any]) -> None:
    operation = load(doc)[path]["POST"]
    case = operation.Case(body=copy.deepcopy(body), media_type="application/json")
    case.call_and_validate(checks=CHECKS, app=app, headers={"Authorization": f"Bearer {KEY}"})


def test_a_wrong_document_fails(app: Any) -> None:
    """Each check fails when the document and the answers disagree."""
    doc = document()
    for body in CHAT_EXAMPLES.values():
        _call(doc, app, "/v1/chat/completions", body)  # as declared: passes
    for body in RESPONSE_EXAMPLES.values():
        _call(doc, app, "/v1/responses", body)

    def broken(edit: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        wrong = copy.deepcopy(doc)
        edit(wrong)
        return wrong

    schemas = doc["components"]["schemas"]
    chunk_object = broken(
        lambda d: d["components"]["schemas"]["ChatCompletionChunk"]["properties"].update(
            object={"const": "chat.completion"}
        )
    )
    text_delta = broken(
        lambda d: d["components"]["schemas"]["TextDeltaEvent"]["properties"].update(
            delta={"type": "integer"}
        )
    )
    answer_usage = broken(
        lambda d: d["components"]["schemas"]["ChatUsage"]["required"].append("cost")
    )
    no_404 = broken(lambda d: d["paths"]["/v1/responses"]["post"]["responses"].pop("404"))
    assert "object" in schemas["ChatCompletionChunk"]["properties"]
    mistakes = [
        (chunk_object, "/v1/chat/completions", CHAT_EXAMPLES["stream"]),
        (text_delta, "/v1/responses", RESPONSE_EXAMPLES["stream"]),
        (answer_usage, "/v1/chat/completions", CHAT_EXAMPLES["answer"]),
        (no_404, "/v1/responses", {**RESPONSE_EXAMPLES["answer"], "model": "nope"}),
    ]
    for wrong, path, body in mistakes:
        with pytest.raises(FailureGroup):
            _call(wrong, app, path, body)


# Server errors this test found once, kept as regressions: each must be a 400 now.
REGRESSIONS = [
    ("/v1/chat/completions", {**CHAT_EXAMPLES["answer"], "response_format": {"type": {}}}),
    ("/v1/responses", {**RESPONSE_EXAMPLES["answer"], "tool_choice": {"function": [1]}}),
]


@pytest.mark.parametrize(("path", "body"), REGRESSIONS, ids=["format_type_dict", "tool_fn_list"])
def test_former_server_errors_are_400s(app: Any, path: str, body: dict[str, Any]) -> None:
    _call(document(), app, path, body)
