"""Request fields -> the decoder's SamplingParams / StopConditions / OutputOptions (pass-through:
the decoder owns their meaning; the gateway only checks shapes and ranges)."""

from __future__ import annotations

import json
from typing import Any

from prism.v1 import decoder_pb2

from services.gateway.schemas import GenerationFields
from shared.errors import InvalidRequestError

_FORMAT_TYPES = {
    "text": decoder_pb2.ResponseFormat.TYPE_TEXT,
    "json_object": decoder_pb2.ResponseFormat.TYPE_JSON_OBJECT,
    "json_schema": decoder_pb2.ResponseFormat.TYPE_JSON_SCHEMA,
}


def sampling_params(req: GenerationFields) -> decoder_pb2.SamplingParams:
    sp = decoder_pb2.SamplingParams(n=1)
    if req.temperature is not None:
        sp.temperature = req.temperature
    if req.top_p is not None:
        sp.top_p = req.top_p
    if req.top_k is not None and req.top_k > 0:  # -1 and 0 both mean "disabled"
        sp.top_k = req.top_k
    if req.min_p is not None:
        sp.min_p = req.min_p
    if req.repetition_penalty is not None:
        sp.repetition_penalty = req.repetition_penalty
    sp.presence_penalty = req.presence_penalty or 0.0
    sp.frequency_penalty = req.frequency_penalty or 0.0
    if req.seed is not None:
        sp.seed = req.seed % 2**64  # OpenAI seeds are any int; the wire type is uint64
    for key, bias in (req.logit_bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            raise InvalidRequestError(
                f"logit_bias keys must be token ids, got {key!r}", param="logit_bias"
            ) from None
        if not -100 <= bias <= 100 or not 0 <= token < 2**31:
            raise InvalidRequestError(
                "logit_bias values must be in [-100, 100] for valid token ids", param="logit_bias"
            )
        sp.logit_bias[token] = bias
    return sp


def stop_conditions(req: GenerationFields, max_tokens: int | None) -> decoder_pb2.StopConditions:
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    return decoder_pb2.StopConditions(
        max_tokens=max_tokens or 0,
        stop=[s for s in stop if s],
        stop_token_ids=req.stop_token_ids or [],
        ignore_eos=req.ignore_eos,
        min_tokens=req.min_tokens or 0,
    )


def response_format(fmt: Any, param: str) -> decoder_pb2.ResponseFormat:
    """Chat's response_format or the Responses API's text.format."""
    if not fmt:
        return decoder_pb2.ResponseFormat()
    if not isinstance(fmt, dict):
        raise InvalidRequestError(f"{param} must be an object", param=param)
    kind = fmt.get("type", "text")
    if not isinstance(kind, str) or kind not in _FORMAT_TYPES:
        raise InvalidRequestError(
            f"{param}.type must be one of {sorted(_FORMAT_TYPES)}", param=param
        )
    out = decoder_pb2.ResponseFormat(type=_FORMAT_TYPES[kind])
    if kind == "json_schema":
        spec = fmt.get("json_schema", fmt)  # chat nests it; Responses puts it inline
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise InvalidRequestError(f"{param}: json_schema needs a 'schema' object", param=param)
        out.json_schema = json.dumps(schema)
        out.strict = bool(spec.get("strict", False))
    return out


def tool_choice(choice: str | dict[str, Any] | None) -> str:
    if choice is None:
        return ""
    if isinstance(choice, str):
        if choice not in ("auto", "none", "required"):
            raise InvalidRequestError(f"unknown tool_choice {choice!r}", param="tool_choice")
        return choice
    function = choice.get("function")
    name = choice.get("name") or (function.get("name") if isinstance(function, dict) else None)
    if not isinstance(name, str) or not name:
        raise InvalidRequestError("tool_choice needs a function name", param="tool_choice")
    return name


def chat_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Tools in chat's shape ({"type": "function", "function": {...}}) whichever API sent them."""
    out = []
    for i, tool in enumerate(tools or []):
        if tool.get("type", "function") != "function":
            raise InvalidRequestError(
                f"tools[{i}]: only function tools are supported", param=f"tools[{i}]"
            )
        if "function" in tool:
            out.append(tool)
        else:  # Responses API: the function's fields sit on the tool itself
            fn = {k: v for k, v in tool.items() if k != "type"}
            out.append({"type": "function", "function": fn})
    return out


def output_options(
    req: GenerationFields,
    *,
    logprobs: bool,
    fmt: decoder_pb2.ResponseFormat,
) -> decoder_pb2.OutputOptions:
    out = decoder_pb2.OutputOptions(
        logprobs=logprobs,
        top_logprobs=req.top_logprobs or 0,
        response_format=fmt,
        tool_choice=tool_choice(req.tool_choice),
        parse_reasoning=req.parse_reasoning,
        skip_special_tokens=req.skip_special_tokens,
        thinking_budget=req.thinking_budget or 0,
    )
    if req.enable_thinking is not None:
        out.enable_thinking = req.enable_thinking
    return out
