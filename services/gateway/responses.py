"""POST /v1/responses: OpenAI's Responses API (stateless: no `previous_response_id`).

Streaming follows OpenAI's event order: response.created, response.in_progress, then per output
item output_item.added, content_part.added, the deltas (response.reasoning_text.delta for a
reasoning item, response.output_text.delta for the message), their .done, content_part.done and
output_item.done; then one added/done pair per function call; then response.completed
(response.incomplete when max_output_tokens cut it short; response.failed on an error after the
stream began). Items open when their first delta arrives: reasoning (which comes first) is
output_index 0 when there is any, then the message; an answer made only of tool calls has no
message item, as with OpenAI.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from prism.v1 import decoder_pb2

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
from services.gateway.response_items import ResponseBuilder, lp_json
from services.gateway.schemas import ResponsesRequest
from shared.errors import InvalidRequestError, PrismError

LOGPROBS_INCLUDE = "message.output_text.logprobs"


class _Stream:
    """OpenAI's event sequence, with output items opened as their first delta arrives."""

    def __init__(self, b: ResponseBuilder) -> None:
        self.b, self.seq, self.next_index = b, itertools.count(), 0
        self.reasoning: dict[str, Any] | None = None  # the open reasoning item's position
        self.message: dict[str, Any] | None = None

    def event(self, kind: str, **fields: Any) -> str:
        return sse({"type": kind, "sequence_number": next(self.seq), **fields}, event=kind)

    def _open(self, item: dict[str, Any], part: dict[str, Any]) -> Iterator[str]:
        where = {"item_id": item["id"], "output_index": self.next_index, "content_index": 0}
        self.next_index += 1
        yield self.event("response.output_item.added", output_index=where["output_index"],
                         item=item)  # fmt: skip
        yield self.event("response.content_part.added", **where, part=part)
        return where

    def reasoning_delta(self, text: str) -> Iterator[str]:
        if self.reasoning is None:
            if self.message is not None:  # reasoning after the answer began: reported at the end
                return
            item = self.b.reasoning_item("in_progress", None)
            part = {"type": "reasoning_text", "text": ""}
            self.reasoning = yield from self._open(item, part)
            self.reasoning["text"] = ""
        self.reasoning["text"] += text
        where = {k: v for k, v in self.reasoning.items() if k != "text"}
        yield self.event("response.reasoning_text.delta", **where, delta=text)

    def close_reasoning(self) -> Iterator[str]:
        r = self.reasoning
        if r is None or "done" in r:
            return
        r["done"] = True
        where = {k: r[k] for k in ("item_id", "output_index", "content_index")}
        part = {"type": "reasoning_text", "text": r["text"]}
        yield self.event("response.reasoning_text.done", **where, text=r["text"])
        yield self.event("response.content_part.done", **where, part=part)
        item = self.b.reasoning_item("completed", r["text"])
        yield self.event("response.output_item.done", output_index=where["output_index"], item=item)

    def open_message(self) -> Iterator[str]:
        if self.message is None:
            self.b.reasoning_first = self.reasoning is not None
            yield from self.close_reasoning()
            self.b.message_streamed = True
            item, part = self.b.message("in_progress", []), self.b.text_part("", [])
            self.message = yield from self._open(item, part)


async def stream_response(gen: Generation, b: ResponseBuilder) -> AsyncIterator[str]:
    st = _Stream(b)
    yield st.event("response.created", response=b.response("in_progress", []))
    yield st.event("response.in_progress", response=b.response("in_progress", []))
    result = Collected()
    try:
        async for ev in gen.events():
            result.add(ev)
            if not ev.HasField("delta"):
                continue
            d = ev.delta
            for chunk in st.reasoning_delta(d.reasoning_text) if d.reasoning_text else ():
                yield chunk
            if d.text or d.logprobs:
                for chunk in st.open_message():
                    yield chunk
                lps = [lp_json(lp, False) for lp in d.logprobs] if b.logprobs else []
                yield st.event("response.output_text.delta", **st.message, delta=d.text,
                               logprobs=lps)  # fmt: skip
        if result.finish is None or result.finish.reason == decoder_pb2.FINISH_REASON_ERROR:
            reason = result.finish.error if result.finish else ""
            raise BadGatewayError(f"generation failed: {reason or 'decoder error'}")
    except PrismError as exc:
        gen.metrics.errors.labels(error_kind(exc.http_status)).inc()
        code = "rate_limit_exceeded" if exc.http_status == 429 else "server_error"
        failed = b.response("failed", [], error={"code": code, "message": exc.message})
        yield st.event("response.failed", response=failed)
        return
    except asyncio.CancelledError:
        gen.metrics.errors.labels("client_disconnected").inc()
        raise
    for chunk in st.close_reasoning():
        yield chunk
    if not result.tool_calls:  # a text answer always has its message, even an empty one
        for chunk in st.open_message():
            yield chunk
    final = b.final(result)
    for index, item in enumerate(final["output"]):
        if index < st.next_index and item["type"] == "message":
            part, where = item["content"][0], st.message
            done_lps = [{k: v for k, v in lp.items() if k != "bytes"} for lp in part["logprobs"]]
            yield st.event("response.output_text.done", **where, text=part["text"],
                           logprobs=done_lps)  # fmt: skip
            yield st.event("response.content_part.done", **where, part=part)
            yield st.event("response.output_item.done", output_index=index, item=item)
        elif index >= st.next_index:  # not streamed: function calls, late reasoning
            yield st.event("response.output_item.added", output_index=index, item=item)
            yield st.event("response.output_item.done", output_index=index, item=item)
    kind = "response.completed" if final["status"] == "completed" else "response.incomplete"
    yield st.event(kind, response=final)


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
