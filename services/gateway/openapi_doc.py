"""The OpenAPI document: each route's request body, answers and auth.

The handlers read their bodies themselves (`common.parse_body`: size cap, OpenAI's error shape),
so FastAPI cannot infer either side; app.py declares every route with `route_openapi` and adds
`openapi_components`, which holds the request models and the answer models of `answers.py`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from services.gateway.answers import (
    CacheResetResponse,
    CacheStatsResponse,
    ChatCompletion,
    ChatCompletionChunk,
    ErrorResponse,
    HealthResponse,
    ModelList,
    NotReadyResponse,
    ReadyResponse,
    ResponseObject,
    ResponseStreamEvent,
)

# --- The OpenAPI document ------------------------------------------------------------------------
# The handlers read their bodies themselves (parse_body: size cap, OpenAI's error shape), so
# FastAPI cannot infer bodies or answers: app.py declares them with these helpers and
# openapi_components() supplies every schema they name.

ERROR_DESCRIPTIONS = {
    400: "Invalid request (OpenAI's error shape)",
    401: "Missing or wrong API key (only with --api-key)",
    404: "Unknown model",
    413: "Request body over --max-body-bytes",
    429: "The decoder's queue is full (Retry-After)",
    500: "Unexpected gateway error",
    502: "A backend failed",
    503: "No healthy backend for the model",
    504: "The request's deadline passed",
}
POST_ERRORS = (400, 401, 413, 500)
GENERATION_ERRORS = (*POST_ERRORS, 404, 429, 502, 503, 504)


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    content = {"application/json": {"schema": ref("ErrorResponse")}}
    return {code: {"description": ERROR_DESCRIPTIONS[code], "content": content} for code in codes}


def json_body(
    name: str, examples: dict[str, dict[str, Any]], required: bool = True
) -> dict[str, Any]:
    """`openapi_extra` declaring a JSON request body (with named example values)."""
    named = {key: {"value": value} for key, value in examples.items()}
    content = {"application/json": {"schema": ref(name), "examples": named}}
    return {"requestBody": {"required": required, "content": content}}


DEMO_MODEL = "prism-demo"  # what `make run-local` serves without MODEL
_CHAT = {"model": DEMO_MODEL, "messages": [{"role": "user", "content": "Write a haiku."}]}
_RESPONSE = {"model": DEMO_MODEL, "input": "Write a haiku.", "instructions": "Be brief."}
CHAT_EXAMPLES = {
    "answer": {**_CHAT, "max_tokens": 64},
    "stream": {**_CHAT, "stream": True, "stream_options": {"include_usage": True}},
}
RESPONSE_EXAMPLES = {
    "answer": {**_RESPONSE, "max_output_tokens": 64},
    "stream": {**_RESPONSE, "stream": True},
}


def sse_item(*payloads: str, done: bool) -> dict[str, Any]:
    """One Server-Sent Event whose `data` is JSON of one of `payloads` (or `[DONE]`)."""
    json_data = {
        "contentMediaType": "application/json",
        "contentSchema": {"anyOf": [ref(p) for p in payloads]},
    }
    data: dict[str, Any] = {"type": "string", **json_data}
    if done:
        data = {"type": "string", "if": {"const": "[DONE]"}, "else": json_data}
    return {
        "type": "object",
        "required": ["data"],
        "properties": {"data": data, "event": {"type": "string"}, "id": {"type": "string"}},
    }


def ok_response(
    name: str | None, description: str, stream: dict[str, Any] | None = None
) -> dict[int | str, dict[str, Any]]:
    content: dict[str, Any] = {}
    if name:
        content["application/json"] = {"schema": ref(name)}
    if stream is not None:
        content["text/event-stream"] = {"itemSchema": stream}
    return {200: {"description": description, "content": content}}


def route_openapi(path: str) -> dict[str, Any]:
    """add_api_route keywords declaring a route's body, answers and auth (path without /v1)."""
    stream_note = ", or with `stream` its {} as Server-Sent Events"
    generation = error_responses(*GENERATION_ERRORS)
    docs: dict[str, tuple[dict[str, Any] | None, dict[int | str, dict[str, Any]]]] = {
        "/chat/completions": (
            json_body("ChatCompletionRequest", CHAT_EXAMPLES),
            {
                **ok_response(
                    "ChatCompletion",
                    "A chat completion" + stream_note.format("chunks, then `[DONE]`"),
                    sse_item("ChatCompletionChunk", "ErrorResponse", done=True),
                ),
                **generation,
            },
        ),
        "/responses": (
            json_body("ResponsesRequest", RESPONSE_EXAMPLES),
            {
                **ok_response(
                    "ResponseObject",
                    "A response" + stream_note.format("events"),
                    sse_item("ResponseStreamEvent", done=False),
                ),
                **generation,
            },
        ),
        "/cache/stats": (
            None,
            {**ok_response("CacheStatsResponse", "Cache numbers"), **error_responses(401, 500)},
        ),
        "/cache/reset": (
            json_body("CacheResetBody", {"both": {"prefix": True, "features": True}}, False),
            {
                **ok_response("CacheResetResponse", "What was removed"),
                **error_responses(*POST_ERRORS, 502, 503, 504),
            },
        ),
        "/models": (
            None,
            {**ok_response("ModelList", "Served models"), **error_responses(401, 500)},
        ),
        "/ready": (
            None,
            {
                **ok_response("ReadyResponse", "Every backend is SERVING"),
                503: {
                    "description": "Some backend is not SERVING",
                    "content": {"application/json": {"schema": ref("NotReadyResponse")}},
                },
                **error_responses(401, 500),
            },
        ),
        "/metrics": (
            None,
            {
                200: {
                    "description": "Prometheus text format",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                },
                **error_responses(401, 500),
            },
        ),
        "/health": (None, ok_response("HealthResponse", "The process is up")),
    }
    body, responses = docs[path]
    extra: dict[str, Any] = dict(body or {})
    if path != "/health":
        extra["security"] = [{"bearer": []}]
    # response_model=None: no schema inferred from the handlers' `dict` return annotations.
    return {"response_model": None, "responses": responses, "openapi_extra": extra or None}


def openapi_components(*request_models: type[BaseModel]) -> dict[str, Any]:
    """Every schema the declarations above name: the request models given (validation mode)
    and this module's response models (serialization mode)."""
    from pydantic import TypeAdapter

    template = "#/components/schemas/{model}"
    out: dict[str, Any] = {}

    def add(name: str, schema: dict[str, Any]) -> None:
        if out.get(name, schema) != schema:
            raise ValueError(f"two different schemas named {name}")
        out[name] = schema

    requests: list[tuple[str, Any, str]] = [(m.__name__, m, "validation") for m in request_models]
    responses = [
        ErrorResponse,
        ChatCompletion,
        ChatCompletionChunk,
        ResponseObject,
        ModelList,
        ReadyResponse,
        NotReadyResponse,
        HealthResponse,
        CacheStatsResponse,
        CacheResetResponse,
    ]
    named: list[tuple[str, Any, str]] = [(m.__name__, m, "serialization") for m in responses]
    named.append(("ResponseStreamEvent", ResponseStreamEvent, "serialization"))
    for name, kind, mode in [*requests, *named]:
        schema = TypeAdapter(kind).json_schema(ref_template=template, mode=mode)
        for def_name, definition in schema.pop("$defs", {}).items():
            add(def_name, definition)
        add(name, schema)
    return out
