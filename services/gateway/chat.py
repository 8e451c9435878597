"""POST /v1/chat/completions in OpenAI's exact shapes (ChatCompletion and its chunks)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from prism.v1 import common_pb2, decoder_pb2

from services.gateway.common import ClosingStreamingResponse, make_job, parse_body, sse
from services.gateway.errors import BadGatewayError, prism_error_body
from services.gateway.generation import (
    FINISH_REASONS,
    Collected,
    Generation,
    collect_unless_disconnected,
    race_disconnect,
)
from services.gateway.messages import chat_messages
from services.gateway.metrics import error_kind
from services.gateway.params import (
    chat_tools,
    output_options,
    response_format,
    sampling_params,
    stop_conditions,
)
from services.gateway.pipeline import Pipeline
from services.gateway.schemas import ChatCompletionRequest
from shared.errors import InvalidRequestError, PrismError


def usage_json(u: common_pb2.Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_prompt_tokens, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": u.reasoning_tokens,
            "accepted_prediction_tokens": u.accepted_draft_tokens,
            "rejected_prediction_tokens": 0,
            "audio_tokens": 0,
        },
    }


def _bytes(raw: bytes, token: str) -> list[int]:
    return list(raw or token.encode("utf-8", "replace"))


def logprobs_json(lps: Iterable[decoder_pb2.TokenLogprob]) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": lp.token,
                "logprob": lp.logprob,
                "bytes": _bytes(lp.bytes, lp.token),
                "top_logprobs": [
                    {"token": t.token, "logprob": t.logprob, "bytes": _bytes(t.bytes, t.token)}
                    for t in lp.top_logprobs
                ],
            }
            for lp in lps
        ],
        "refusal": None,
    }


class ToolCallIndex:
    """Tool-call ids -> stable OpenAI indices; decoders may stream a call in several pieces."""

    def __init__(self) -> None:
        self.calls: dict[str, dict[str, Any]] = {}
        self._last = ""

    def _key(self, tc: decoder_pb2.ToolCall) -> tuple[str, bool]:
        key = tc.id or self._last or f"call_{uuid.uuid4().hex[:24]}"
        self._last = key
        return key, key not in self.calls

    def add(self, tc: decoder_pb2.ToolCall) -> dict[str, Any]:
        """Merge one piece; return its streaming delta."""
        key, new = self._key(tc)
        if new:
            fn = {"name": tc.name, "arguments": tc.arguments}
            self.calls[key] = {"id": key, "type": "function", "function": fn}
            # A copy: later pieces extend the stored arguments, not this delta's.
            return {"index": len(self.calls) - 1, "id": key, "type": "function", "function": {**fn}}
        call = self.calls[key]
        call["function"]["arguments"] += tc.arguments
        index = list(self.calls).index(key)
        return {"index": index, "function": {"arguments": tc.arguments}}


def completion_json(
    result: Collected, cid: str, created: int, model: str, logprobs: bool
) -> dict[str, Any]:
    tools = ToolCallIndex()
    for tc in result.tool_calls:
        tools.add(tc)
    text = "".join(result.text)
    message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
    if tools.calls:
        message["tool_calls"] = list(tools.calls.values())
        message["content"] = text or None
    reasoning = "".join(result.reasoning)
    if reasoning:
        message["reasoning_content"] = reasoning
    finish = result.finish or decoder_pb2.Finish()
    choice = {
        "index": 0,
        "message": message,
        "logprobs": logprobs_json(result.logprobs) if logprobs else None,
        "finish_reason": FINISH_REASONS.get(finish.reason, "stop"),
    }
    return {
        "id": cid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": usage_json(finish.usage),
    }


async def stream_chat(
    gen: Generation, cid: str, created: int, body: ChatCompletionRequest
) -> AsyncIterator[str]:
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": body.model}

    def chunk(delta: dict[str, Any], finish: str | None = None, lp: Any = None) -> str:
        out = {
            **base,
            "choices": [{"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}],
        }
        if include_usage:
            out["usage"] = None  # OpenAI sends usage: null on every chunk but the last
        return sse(out)

    tools = ToolCallIndex()
    yield chunk({"role": "assistant", "content": ""})
    try:
        async for ev in gen.events():
            if ev.HasField("delta"):
                d, delta = ev.delta, {}
                if d.text:
                    delta["content"] = d.text
                if d.reasoning_text:
                    delta["reasoning_content"] = d.reasoning_text
                if d.tool_calls:
                    delta["tool_calls"] = [tools.add(tc) for tc in d.tool_calls]
                lp = logprobs_json(d.logprobs) if body.logprobs and d.logprobs else None
                if delta or lp:
                    yield chunk(delta, lp=lp)
                continue
            f = ev.finish
            if f.reason == decoder_pb2.FINISH_REASON_ERROR:
                raise BadGatewayError(f"generation failed: {f.error or 'decoder error'}")
            yield chunk({}, finish=FINISH_REASONS.get(f.reason, "stop"))
            if include_usage:
                yield sse({**base, "choices": [], "usage": usage_json(f.usage)})
    except PrismError as exc:  # after the 200 went out: report in-band, as OpenAI does
        gen.metrics.errors.labels(error_kind(exc.http_status)).inc()
        yield sse(prism_error_body(exc))
    except asyncio.CancelledError:
        gen.metrics.errors.labels("client_disconnected").inc()
        raise
    yield "data: [DONE]\n\n"


async def chat_completions(request: Request) -> Response:
    pipeline: Pipeline = request.app.state.pipeline
    body = await parse_body(request, ChatCompletionRequest)
    if body.n not in (None, 1):
        raise InvalidRequestError("n must be 1: one completion per request is supported", param="n")
    generate = decoder_pb2.GenerateRequest(
        sampling=sampling_params(body),
        stop=stop_conditions(body, body.limit),
        output=output_options(
            body,
            logprobs=bool(body.logprobs),
            fmt=response_format(body.response_format, "response_format"),
        ),
        priority=body.priority,
    )
    tools = chat_tools(body.tools)
    if tools:
        generate.messages.tools_json = json.dumps(tools)
    if body.chat_template_kwargs:
        generate.messages.chat_template_kwargs_json = json.dumps(body.chat_template_kwargs)
    job = make_job(request, pipeline, body, chat_messages(body.messages), generate)
    gen = await race_disconnect(request, pipeline.start(job))
    cid, created = f"chatcmpl-{job.request_id}", int(time.time())
    if body.stream:
        return ClosingStreamingResponse(stream_chat(gen, cid, created, body), gen.close)
    result = await collect_unless_disconnected(gen, request)
    return JSONResponse(completion_json(result, cid, created, body.model, bool(body.logprobs)))
