"""Graceful drain on SIGTERM/SIGINT: stop being ready, refuse new work, finish what is running.

uvicorn's own shutdown closes the listening socket at once: a request that arrives during the
grace period meets "connection refused" and `/ready` never gets to say that the process is
going away. Here the first signal only marks the gateway draining: `/ready` and every new
request answer 503 (`code: shutting_down`, `Retry-After`, `Connection: close`) while `/health`
and `/metrics` keep answering, and the requests already running (streams included) go on. When
none is left, or `--grace` has passed, uvicorn's shutdown runs (with whatever is left of the
grace); the process then exits 0. A second signal is uvicorn's own: stop now.
"""

from __future__ import annotations

import asyncio
import json
import socket
from dataclasses import dataclass
from types import FrameType

import structlog
import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from services.gateway.errors import error_body

log = structlog.get_logger("gateway")

# Still answered while draining: liveness, and the scrape that shows the drain happening.
EXEMPT = frozenset({"/health", "/v1/health", "/metrics", "/v1/metrics"})
READY = frozenset({"/ready", "/v1/ready"})
POLL_S = 0.05


@dataclass
class Drain:
    draining: bool = False
    active: int = 0  # requests admitted and not finished yet
    refused: int = 0  # requests answered 503 because of the drain


class DrainGate:
    """ASGI wrapper: while draining, answers 503 to everything but `EXEMPT` and counts the
    requests it lets through (so the server knows when the last one is done)."""

    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app, self.drain = app, drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan (and websockets, which we do not serve)
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if self.drain.draining and path not in EXEMPT:
            self.drain.refused += 1
            await _refuse(path, send)
            return
        self.drain.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.active -= 1


async def _refuse(path: str, send: Send) -> None:
    body = error_body(
        "the server is shutting down; retry the request (another replica will take it)",
        "server_error",
        code="shutting_down",
    )
    if path in READY:
        body["status"] = "draining"
    payload = json.dumps(body).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
        (b"retry-after", b"1"),
        (b"connection", b"close"),  # the client's next attempt should open a new connection
    ]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM/SIGINT drains (see the module doc) before shutting
    down; `grace` bounds the drain and uvicorn's own shutdown together."""

    def __init__(self, config: uvicorn.Config, drain: Drain, grace: float) -> None:
        super().__init__(config)
        self.drain, self.grace = drain, grace
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drainer: asyncio.Task[None] | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain.draining or self._loop is None or not self.started:
            super().handle_exit(sig, frame)  # a second signal, or one before serving: stop now
            return
        self.drain.draining = True
        # A signal handler may run in the middle of the loop's own code: hand over through
        # the loop's thread-safe wake-up instead of touching it from here.
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drainer = asyncio.create_task(self._drain(), name="gateway-drain")

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.grace
        log.info("draining", grace_s=self.grace, in_flight=self.drain.active)
        while self.drain.active and loop.time() < deadline:
            await asyncio.sleep(POLL_S)
        left = deadline - loop.time()
        log.info(
            "drained",
            in_flight=self.drain.active,  # > 0: the grace ran out; uvicorn cancels them
            refused=self.drain.refused,
            waited_s=round(self.grace - max(left, 0.0), 3),
        )
        # uvicorn's shutdown (close connections, lifespan) gets what is left of the grace.
        self.config.timeout_graceful_shutdown = max(1, int(left))
        self.should_exit = True
