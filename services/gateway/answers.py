"""What the gateway's routes answer, field for field, for the OpenAPI document only.

The handlers build plain dicts; these models describe them so schemathesis and the official
OpenAI document can check every answer (tests/test_gateway_schemathesis.py,
tests/test_openai_spec.py). `openapi_doc` declares them on the routes.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

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
