"""Request bodies of the OpenAI routes. Ranges are checked here so a bad value is a 400 that
names the field; unknown OpenAI fields are accepted and ignored (clients send many)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

INT32_MAX = 2**31 - 1  # the wire's int32/uint32 fields must never overflow (a 500)
TokenId = Annotated[int, Field(ge=0, le=INT32_MAX)]


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


# What the handlers (messages.py, params.py) accept beyond these types; stated in the OpenAPI
# document only (`json_schema_extra`), while a value outside stays the handlers' 400 that names
# the field. tests/test_gateway_schemathesis.py checks CHAT_ROLES against messages.ROLES.
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
_NAMED_FUNCTION = {"type": "string", "minLength": 1}
TOOL_CHOICE_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"enum": ["auto", "none", "required"]},
        {"type": "object", "required": ["name"], "properties": {"name": _NAMED_FUNCTION}},
        {
            "type": "object",
            "required": ["function"],
            "properties": {
                "function": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {"name": _NAMED_FUNCTION},
                }
            },
        },
        {"type": "null"},
    ]
}
LOGIT_BIAS_SCHEMA: dict[str, Any] = {  # token id -> bias
    "anyOf": [
        {
            "type": "object",
            "propertyNames": {"pattern": "^[0-9]{1,9}$"},
            "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
        },
        {"type": "null"},
    ]
}
RESPONSE_FORMAT_SCHEMA: dict[str, Any] = {  # chat's response_format; Responses' text.format
    "anyOf": [
        {  # no `type` means text
            "type": "object",
            "properties": {"type": {"enum": ["text", "json_object"]}},
        },
        {
            "type": "object",
            "required": ["type", "json_schema"],
            "properties": {
                "type": {"const": "json_schema"},
                "json_schema": {
                    "type": "object",
                    "required": ["schema"],
                    "properties": {"schema": {"type": "object"}},
                },
            },
        },
        {"type": "null"},
    ]
}

TEXT_SCHEMA: dict[str, Any] = {  # the Responses API's `text`: json_schema inline in the format
    "anyOf": [
        {
            "type": "object",
            "properties": {
                "format": {
                    "anyOf": [
                        RESPONSE_FORMAT_SCHEMA["anyOf"][0],
                        {
                            "type": "object",
                            "required": ["type", "schema"],
                            "properties": {
                                "type": {"const": "json_schema"},
                                "schema": {"type": "object"},
                            },
                        },
                    ]
                }
            },
        },
        {"type": "null"},
    ]
}


class ChatMessageIn(_Lenient):
    role: str = Field(json_schema_extra={"enum": list(CHAT_ROLES)})
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    reasoning_content: str | None = None


class StreamOptions(_Lenient):
    include_usage: bool = False


class GenerationFields(_Lenient):
    """Sampling and output fields both APIs share (plus vLLM's common extensions)."""

    model: str = Field(min_length=1)
    stream: bool = False
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1, le=INT32_MAX)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0, le=10)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(default=None, json_schema_extra=LOGIT_BIAS_SCHEMA)
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[TokenId] | None = None
    min_tokens: int | None = Field(default=None, ge=0, le=INT32_MAX)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = Field(
        default=None, json_schema_extra=TOOL_CHOICE_SCHEMA
    )
    chat_template_kwargs: dict[str, Any] | None = None
    # Reasoning models (as mlx-vlm's and vLLM's servers accept them): unset = server default.
    enable_thinking: bool | None = None
    thinking_budget: int | None = Field(default=None, ge=0, le=INT32_MAX)
    # Split <think>...</think> into reasoning_content / a reasoning item (false: leave it inline).
    parse_reasoning: bool = True
    priority: int = Field(default=0, ge=-INT32_MAX, le=INT32_MAX)


class ChatCompletionRequest(GenerationFields):
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)
    n: int | None = Field(default=1, json_schema_extra={"enum": [1, None]})
    stream_options: StreamOptions | None = None
    logprobs: bool | None = False
    response_format: dict[str, Any] | None = Field(
        default=None, json_schema_extra=RESPONSE_FORMAT_SCHEMA
    )

    @property
    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class ResponsesRequest(GenerationFields):
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)
    # {"format": {"type": "text" | "json_object" | "json_schema", ...}}
    text: dict[str, Any] | None = Field(default=None, json_schema_extra=TEXT_SCHEMA)
    previous_response_id: str | None = None
    # "message.output_text.logprobs" asks for logprobs on the output text.
    include: list[str] | None = None
    metadata: dict[str, str] | None = None
    parallel_tool_calls: bool = True


# --- Response bodies -----------------------------------------------------------------------------
# For the OpenAPI document only (the handlers build plain dicts): they describe what the routes
# send, so schemathesis can check every response against it (tests/test_gateway_schemathesis.py).
# Field for field what chat.py, response_items.py, responses.py, cache_admin.py and app.py emit;
# a field added there belongs here too. Extra fields are not forbidden (OpenAI adds fields).


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | int | None


class ErrorResponse(BaseModel):
    """OpenAI's error shape: every 4xx/5xx, and an in-band error event of a chat stream."""

    error: ErrorDetail


FinishReason = Literal["stop", "length", "tool_calls", "content_filter"]


class FunctionCall(BaseModel):
    name: str
    arguments: str


class ChatToolCall(BaseModel):
    id: str
    type: Literal["function"]
    function: FunctionCall


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ChatToolCallDelta(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None


class PromptTokensDetails(BaseModel):
    cached_tokens: int
    audio_tokens: int = 0


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int
    accepted_prediction_tokens: int = 0
    rejected_prediction_tokens: int = 0
    audio_tokens: int = 0


class ChatUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None
    completion_tokens_details: CompletionTokensDetails | None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"]
    content: str | None
    refusal: str | None = None
    tool_calls: list[ChatToolCall] | None = None
    reasoning_content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChoiceLogprobs | None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: ChatUsage
    system_fingerprint: str | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ChatToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None


class ChatCompletionChunk(BaseModel):
    """One `data:` of a chat stream (the stream ends with `data: [DONE]`)."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: ChatUsage | None = None
    system_fingerprint: str | None = None


class OutputText(BaseModel):
    type: Literal["output_text"]
    text: str
    annotations: list[dict[str, Any]]
    logprobs: list[TokenLogprob]


class ReasoningText(BaseModel):
    type: Literal["reasoning_text"]
    text: str


ItemStatus = Literal["in_progress", "completed", "incomplete"]


class MessageItem(BaseModel):
    type: Literal["message"]
    id: str
    status: ItemStatus
    role: Literal["assistant"]
    content: list[OutputText]


class ReasoningItem(BaseModel):
    type: Literal["reasoning"]
    id: str
    summary: list[dict[str, Any]]
    content: list[ReasoningText]
    status: ItemStatus


class FunctionCallItem(BaseModel):
    type: Literal["function_call"]
    id: str
    call_id: str
    name: str
    arguments: str
    status: ItemStatus


OutputItem = Annotated[MessageItem | ReasoningItem | FunctionCallItem, Field(discriminator="type")]


class ResponseError(BaseModel):
    code: str
    message: str


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens", "content_filter"]


class InputTokensDetails(BaseModel):
    cached_tokens: int
    cache_write_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class ResponseObject(BaseModel):
    """The Responses API's response object (the non-streamed answer, and inside events)."""

    id: str
    object: Literal["response"]
    created_at: int
    status: Literal["completed", "failed", "in_progress", "incomplete"]
    completed_at: int | None = None
    model: str
    output: list[OutputItem]
    error: ResponseError | None
    incomplete_details: IncompleteDetails | None
    instructions: str | None
    max_output_tokens: int | None
    metadata: dict[str, str]
    parallel_tool_calls: bool
    previous_response_id: str | None
    temperature: float | None
    top_p: float | None
    top_logprobs: int | None = None
    tool_choice: str | dict[str, Any]
    tools: list[dict[str, Any]]
    text: dict[str, Any]
    truncation: Literal["auto", "disabled"] | None = None
    usage: ResponseUsage | None = None


class _Event(BaseModel):
    sequence_number: int


class ResponseLifecycleEvent(_Event):
    type: Literal[
        "response.created",
        "response.in_progress",
        "response.completed",
        "response.incomplete",
        "response.failed",
    ]
    response: ResponseObject


class OutputItemEvent(_Event):
    type: Literal["response.output_item.added", "response.output_item.done"]
    output_index: int
    item: OutputItem


class _PartEvent(_Event):
    item_id: str
    output_index: int
    content_index: int


class ContentPartEvent(_PartEvent):
    type: Literal["response.content_part.added", "response.content_part.done"]
    part: Annotated[OutputText | ReasoningText, Field(discriminator="type")]


class TextDeltaEvent(_PartEvent):
    type: Literal["response.output_text.delta"]
    delta: str
    logprobs: list[TokenLogprob]


class TextDoneEvent(_PartEvent):
    type: Literal["response.output_text.done"]
    text: str
    logprobs: list[TokenLogprob]


class ReasoningDeltaEvent(_PartEvent):
    type: Literal["response.reasoning_text.delta"]
    delta: str


class ReasoningDoneEvent(_PartEvent):
    type: Literal["response.reasoning_text.done"]
    text: str


ResponseStreamEvent = Annotated[
    ResponseLifecycleEvent
    | OutputItemEvent
    | ContentPartEvent
    | TextDeltaEvent
    | TextDoneEvent
    | ReasoningDeltaEvent
    | ReasoningDoneEvent,
    Field(discriminator="type"),
]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    modalities: list[Literal["text", "image", "video", "audio"]]
    max_model_len: int | None = None
    random_weights: bool | None = None


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class BackendStatus(BaseModel):
    kind: Literal["encoder", "decoder"]
    address: str
    configured_as: str
    healthy: bool
    models: list[str]
    error: str | None


class ReadyResponse(BaseModel):
    status: Literal["ready"]
    backends: list[BackendStatus]


class NotReadyResponse(ErrorResponse):
    status: Literal["not ready"]
    down: list[str]
    backends: list[BackendStatus]


class HealthResponse(BaseModel):
    status: Literal["ok"]


class TierStats(BaseModel):
    entries: int
    bytes: int
    capacity_bytes: int
    hits: int
    evictions: int


class PrefixCacheStats(BaseModel):
    enabled: bool
    block_size: int
    decoders: int
    queries: int
    query_tokens: int
    matched_tokens: int
    memory_hits: int
    remote_hits: int
    misses: int
    blocks_written: int
    hit_rate: float = Field(ge=0, le=1)
    memory: TierStats


class NamespaceStats(BaseModel):
    memory: TierStats
    disk: TierStats
    misses: int
    puts: int
    disk_errors: int


class CacheServiceStats(BaseModel):
    kv: NamespaceStats
    features: NamespaceStats


class CacheStatsResponse(BaseModel):
    object: Literal["cache.stats"]
    prefix_cache: PrefixCacheStats
    cache_service: CacheServiceStats | None


class RemovedEntries(BaseModel):
    kv: int | None = None
    features: int | None = None


class CacheResetResponse(BaseModel):
    object: Literal["cache.reset"]
    removed_blocks: int
    removed_entries: RemovedEntries | None
    decoders: int


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
