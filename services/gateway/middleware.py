"""The outermost layer of every request (pure ASGI, so streaming and disconnects pass through
untouched): request id, body-size cap and deadline, catch-all 500, error metrics and the access
log line."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
import uuid
from typing import Any

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.gateway.errors import (
    ClientClosedError,
    PayloadTooLargeError,
    RequestTimeoutError,
    error_body,
    prism_error_body,
)
from services.gateway.metrics import GatewayMetrics, error_kind

log = structlog.get_logger("gateway")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
DRAIN_SECONDS = 10.0


async def _drain(receive: Receive, budget: int) -> None:
    """Read and discard the rest of a refused body, so the client (which writes its whole body
    before reading) sees our 413 instead of a connection reset. Bounded in bytes and time."""

    async def run() -> None:
        seen = 0
        while seen <= budget:
            msg = await receive()
            if msg["type"] != "http.request" or not msg.get("more_body", False):
                return
            seen += len(msg.get("body", b""))

    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(run(), DRAIN_SECONDS)


async def _send_json(send: Send, status: int, body: dict[str, Any]) -> None:
    payload = json.dumps(body).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


class RequestContextMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int,
        metrics: GatewayMetrics,
        body_timeout: float = 60.0,
    ) -> None:
        self.app, self.max_body_bytes, self.metrics = app, max_body_bytes, metrics
        self.body_timeout = body_timeout

    def _too_large(self) -> PayloadTooLargeError:
        return PayloadTooLargeError(f"request body exceeds the {self.max_body_bytes}-byte limit")

    def _limited(self, receive: Receive, drain: bool) -> Receive:
        """The app's receive, cut at the byte cap and at `body_timeout` seconds for the whole
        body: a client that declares more than it sends, or drips it, cannot hold a request
        open forever (uvicorn has no body timeout of its own)."""
        seen, complete = 0, False
        deadline = time.monotonic() + self.body_timeout

        async def wrapped() -> Message:
            nonlocal seen, complete
            if complete:  # e.g. a streaming response waiting for http.disconnect: no deadline
                return await receive()
            try:
                msg = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.0))
            except asyncio.TimeoutError:
                raise RequestTimeoutError(
                    f"the request body did not arrive within {self.body_timeout:g} s"
                ) from None
            if msg["type"] == "http.disconnect":
                # Gone mid-body: the client's doing (499), not an unhandled server error.
                raise ClientClosedError("the client disconnected before sending the whole body")
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                complete = not msg.get("more_body", False)
                if seen > self.max_body_bytes:
                    if drain and msg.get("more_body", False):
                        await _drain(receive, 4 * self.max_body_bytes)
                    raise self._too_large()
            return msg

        return wrapped

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        given = headers.get("x-request-id", "")
        rid = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"], state["started"] = rid, time.perf_counter()
        status = 0

        async def send_with_id(msg: Message) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
                msg = {**msg, "headers": [*msg.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(msg)

        # A client that waits for "100 Continue" sends no body we would have to drain.
        drain = headers.get("expect", "").lower() != "100-continue"
        with structlog.contextvars.bound_contextvars(request_id=rid):
            try:
                declared = headers.get("content-length", "")
                if declared.isdigit() and int(declared) > self.max_body_bytes:
                    if drain:
                        await _drain(receive, 4 * self.max_body_bytes)
                    exc = self._too_large()
                    await _send_json(send_with_id, exc.http_status, prism_error_body(exc))
                else:
                    await self.app(scope, self._limited(receive, drain), send_with_id)
            except Exception:  # noqa: BLE001 - never an HTML 500 or a bare reset
                log.exception("unhandled_exception", path=scope.get("path"))
                if not status:
                    body = error_body("internal server error", "server_error")
                    await _send_json(send_with_id, 500, body)
            finally:
                self._log(scope, state, status)

    def _log(self, scope: Scope, state: dict[str, Any], status: int) -> None:
        if status >= 400:
            self.metrics.errors.labels(error_kind(status)).inc()
        log.info(
            "access",
            method=scope.get("method"),
            path=scope.get("path"),
            status=status,
            model=state.get("model"),
            latency_ms=round((time.perf_counter() - state["started"]) * 1e3, 2),
        )
