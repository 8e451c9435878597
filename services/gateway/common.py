"""Helpers the OpenAI routes share: body parsing, request identity, tenant, SSE framing."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.types import Receive, Scope, Send

from services.gateway.config import GatewayConfig
from services.gateway.messages import Message, media_specs
from services.gateway.pipeline import Job, Pipeline
from services.gateway.schemas import GenerationFields
from shared.errors import InvalidRequestError

M = TypeVar("M", bound=BaseModel)
TENANT_HEADER = "x-apc-tenant"


async def parse_body(request: Request, model: type[M]) -> M:
    """Read and validate the JSON body ourselves: the body-size cap (middleware) applies while
    reading, and pydantic errors go through the same 400 handler as FastAPI's own."""
    raw = await request.body()
    if not raw.strip():
        raise InvalidRequestError("the request body is empty")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"the request body is not valid JSON: {exc}") from exc
    except RecursionError:  # e.g. 100k nested brackets: hostile, not a server error
        raise InvalidRequestError("the request body is nested too deeply") from None
    if not isinstance(data, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    try:
        body = model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from exc
    if isinstance(body, GenerationFields):
        request.state.model = body.model  # for the access log
    return body


def request_id(request: Request) -> str:
    return str(request.state.request_id)


def tenant(request: Request, config: GatewayConfig) -> str:
    """APC isolation salt (prefix blocks and media features are keyed by it).

    Keys off: the X-APC-Tenant header, or none. Keys on: a digest of the (already verified)
    key, with the header appended as a sub-tenant, so a client can split its own key's cache
    but never name a salt that another key's requests use.
    """
    header = request.headers.get(TENANT_HEADER, "").strip()[:256]
    if not config.api_key:
        return header
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    key = token.strip() if scheme.lower() == "bearer" else ""
    digest = hashlib.sha256(key.encode()).hexdigest()[:32]
    return f"{digest}:{header}" if header else digest


def make_job(
    request: Request,
    pipeline: Pipeline,
    body: GenerationFields,
    messages: list[Message],
    generate: Any,
) -> Job:
    info = pipeline.model_info(body.model)
    specs = media_specs(messages)
    pipeline.check_media(body.model, info, specs)
    return Job(
        request_id=request_id(request),
        model=body.model,
        messages=messages,
        media=specs,
        request=generate,
        tenant=tenant(request, pipeline.config),
        deadline=time.monotonic() + pipeline.config.request_timeout,
        arrived=getattr(request.state, "started", None) or time.perf_counter(),
    )


def sse(data: dict[str, Any], event: str | None = None) -> str:
    payload = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return f"event: {event}\ndata: {payload}\n\n" if event else f"data: {payload}\n\n"


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that runs `on_close` however it ends (finished, failed, or the
    client disconnected before the body generator even started)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream", headers=SSE_HEADERS)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
