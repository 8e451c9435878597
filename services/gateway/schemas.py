"""Request bodies of the OpenAI routes. Ranges are checked here so a bad value is a 400 that
names the field; unknown OpenAI fields are accepted and ignored (clients send many)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

INT32_MAX = 2**31 - 1  # the wire's int32/uint32 fields must never overflow (a 500)
TokenId = Annotated[int, Field(ge=0, le=INT32_MAX)]


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class ChatMessageIn(_Lenient):
    role: str
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
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[TokenId] | None = None
    min_tokens: int | None = Field(default=None, ge=0, le=INT32_MAX)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
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
    n: int | None = 1
    stream_options: StreamOptions | None = None
    logprobs: bool | None = False
    response_format: dict[str, Any] | None = None

    @property
    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class ResponsesRequest(GenerationFields):
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)
    # {"format": {"type": "text" | "json_object" | "json_schema", ...}}
    text: dict[str, Any] | None = None
    previous_response_id: str | None = None
    # "message.output_text.logprobs" asks for logprobs on the output text.
    include: list[str] | None = None
    metadata: dict[str, str] | None = None
    parallel_tool_calls: bool = True
