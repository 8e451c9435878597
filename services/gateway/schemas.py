"""Request bodies of the OpenAI routes. Ranges are checked here so a bad value is a 400 that
names the field; unknown OpenAI fields are accepted and ignored (clients send many)."""

from __future__ import annotations

from typing import Annotated, Any

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
