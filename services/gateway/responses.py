"""POST /v1/responses: OpenAI's Responses API (stateless: no `previous_response_id`).

Streaming follows OpenAI's event order: response.created, response.in_progress,
response.output_item.added, response.content_part.added, response.output_text.delta*,
response.output_text.done, response.content_part.done, response.output_item.done, then one
added/done pair per function call, then response.completed (response.incomplete when
max_output_tokens cut it short; response.failed on an error after the stream began). The message
is always output_index 0; function calls and reasoning follow it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from prism.v1 import common_pb2, decoder_pb2

from services.gateway.chat import ToolCallIndex
from services.gateway.common import ClosingStreamingResponse, make_job, parse_body, sse
from services.gateway.errors import BadGatewayError
from services.gateway.generation import (
    Collected,
    Generation,
    collect_unless_disconnected,
    race_disconnect,
)
from services.gateway.messages import responses_messages
from services.gateway.metrics import error_kind
from services.gateway.params import (
    chat_tools,
    output_options,
    response_format,
    sampling_params,
    stop_conditions,
)
from services.gateway.pipeline import Pipeline
from services.gateway.schemas import ResponsesRequest
from shared.errors import InvalidRequestError, PrismError

LOGPROBS_INCLUDE = "message.output_text.logprobs"


def _lp(lp: decoder_pb2.TokenLogprob, with_bytes: bool) -> dict[str, Any]:
    def one(token: str, logprob: float, raw: bytes) -> dict[str, Any]:
        out: dict[str, Any] = {"token": token, "logprob": logprob}
        if with_bytes:
            out["bytes"] = list(raw or token.encode("utf-8", "replace"))
        return out

    top = [one(t.token, t.logprob, t.bytes) for t in lp.top_logprobs]
    return {**one(lp.token, lp.logprob, lp.bytes), "top_logprobs": top}


class ResponseBuilder:
    def __init__(self, body: ResponsesRequest, response_id: str, logprobs: bool) -> None:
        self.body, self.id, self.logprobs = body, response_id, logprobs
        self.created = int(time.time())
        self.msg_id = f"msg_{uuid.uuid4().hex}"

    def response(
        self,
        status: str,
        output: list[dict[str, Any]],
        usage: common_pb2.Usage | None = None,
        error: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        b = self.body
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "completed_at": int(time.time()) if status == "completed" else None,
            "model": b.model,
            "output": output,
            "error": error,
            "incomplete_details": {"reason": "max_output_tokens"}
            if status == "incomplete"
            else None,
            "instructions": b.instructions,
            "max_output_tokens": b.max_output_tokens,
            "metadata": b.metadata or {},
            "parallel_tool_calls": b.parallel_tool_calls,
            "previous_response_id": None,
            "temperature": b.temperature,
            "top_p": b.top_p,
            "top_logprobs": b.top_logprobs,
            "tool_choice": b.tool_choice or "auto",
            "tools": b.tools or [],
            "text": b.text or {"format": {"type": "text"}},
            "truncation": "disabled",
            "usage": self.usage(usage) if usage is not None else None,
        }

    @staticmethod
    def usage(u: common_pb2.Usage) -> dict[str, Any]:
        return {
            "input_tokens": u.prompt_tokens,
            "input_tokens_details": {
                "cached_tokens": u.cached_prompt_tokens,
                "cache_write_tokens": 0,
            },
            "output_tokens": u.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
            "total_tokens": u.prompt_tokens + u.completion_tokens,
        }

    def text_part(self, text: str, logprobs: list[decoder_pb2.TokenLogprob]) -> dict[str, Any]:
        lps = [_lp(lp, True) for lp in logprobs] if self.logprobs else []
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": lps}

    def message(self, status: str, content: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "type": "message",
            "id": self.msg_id,
            "status": status,
            "role": "assistant",
            "content": content,
        }

    def final(self, result: Collected) -> dict[str, Any]:
        finish = result.finish or decoder_pb2.Finish()
        status = "incomplete" if finish.reason == decoder_pb2.FINISH_REASON_LENGTH else "completed"
        text = "".join(result.text)
        output = [self.message(status, [self.text_part(text, result.logprobs)])]
        tools = ToolCallIndex()
        for tc in result.tool_calls:
            tools.add(tc)
        for call in tools.calls.values():
            output.append(
                {
                    "type": "function_call",
                    "id": f"fc_{uuid.uuid4().hex}",
                    "call_id": call["id"],
                    "name": call["function"]["name"],
                    "arguments": call["function"]["arguments"],
                    "status": "completed",
                }
            )
        reasoning = "".join(result.reasoning)
        if reasoning:
            output.append(
                {
                    "type": "reasoning",
                    "id": f"rs_{uuid.uuid4().hex}",
                    "summary": [],
                    "content": [{"type": "reasoning_text", "text": reasoning}],
                    "status": "completed",
                }
            )
        return self.response(status, output, finish.usage)


async def stream_response(gen: Generation, b: ResponseBuilder) -> AsyncIterator[str]:
    seq = itertools.count()

    def event(kind: str, **fields: Any) -> str:
        return sse({"type": kind, "sequence_number": next(seq), **fields}, event=kind)

    where = {"item_id": b.msg_id, "output_index": 0, "content_index": 0}
    yield event("response.created", response=b.response("in_progress", []))
    yield event("response.in_progress", response=b.response("in_progress", []))
    yield event("response.output_item.added", output_index=0, item=b.message("in_progress", []))
    yield event("response.content_part.added", **where, part=b.text_part("", []))
    result = Collected()
    try:
        async for ev in gen.events():
            result.add(ev)
            if ev.HasField("delta") and (ev.delta.text or ev.delta.logprobs):
                lps = [_lp(lp, False) for lp in ev.delta.logprobs] if b.logprobs else []
                yield event(
                    "response.output_text.delta", **where, delta=ev.delta.text, logprobs=lps
                )
        if result.finish is None or result.finish.reason == decoder_pb2.FINISH_REASON_ERROR:
            reason = result.finish.error if result.finish else ""
            raise BadGatewayError(f"generation failed: {reason or 'decoder error'}")
    except PrismError as exc:
        gen.metrics.errors.labels(error_kind(exc.http_status)).inc()
        code = "rate_limit_exceeded" if exc.http_status == 429 else "server_error"
        failed = b.response("failed", [], error={"code": code, "message": exc.message})
        yield event("response.failed", response=failed)
        return
    except asyncio.CancelledError:
        gen.metrics.errors.labels("client_disconnected").inc()
        raise
    final = b.final(result)
    message = final["output"][0]
    part = message["content"][0]
    done_lps = [{k: v for k, v in lp.items() if k != "bytes"} for lp in part["logprobs"]]
    yield event("response.output_text.done", **where, text=part["text"], logprobs=done_lps)
    yield event("response.content_part.done", **where, part=part)
    yield event("response.output_item.done", output_index=0, item=message)
    for index, item in enumerate(final["output"][1:], start=1):
        yield event("response.output_item.added", output_index=index, item=item)
        yield event("response.output_item.done", output_index=index, item=item)
    kind = "response.completed" if final["status"] == "completed" else "response.incomplete"
    yield event(kind, response=final)


async def create_response(request: Request) -> Response:
    pipeline: Pipeline = request.app.state.pipeline
    body = await parse_body(request, ResponsesRequest)
    if body.previous_response_id:
        raise InvalidRequestError(
            "previous_response_id is not supported: responses are not stored",
            param="previous_response_id",
        )
    logprobs = LOGPROBS_INCLUDE in (body.include or []) or bool(body.top_logprobs)
    fmt = response_format((body.text or {}).get("format"), "text.format")
    generate = decoder_pb2.GenerateRequest(
        sampling=sampling_params(body),
        stop=stop_conditions(body, body.max_output_tokens),
        output=output_options(body, logprobs=logprobs, fmt=fmt),
        priority=body.priority,
    )
    tools = chat_tools(body.tools)
    if tools:
        generate.messages.tools_json = json.dumps(tools)
    if body.chat_template_kwargs:
        generate.messages.chat_template_kwargs_json = json.dumps(body.chat_template_kwargs)
    job = make_job(request, pipeline, body, responses_messages(body), generate)
    gen = await race_disconnect(request, pipeline.start(job))
    builder = ResponseBuilder(body, f"resp_{job.request_id}", logprobs)
    if body.stream:
        return ClosingStreamingResponse(stream_response(gen, builder), gen.close)
    result = await collect_unless_disconnected(gen, request)
    return JSONResponse(builder.final(result))
