"""Client channels with the options every Prism hop uses, and the deadline every call inherits.

Keepalive: `PRISM_GRPC_KEEPALIVE_S` (default 30) sets how long a connection may be silent before
either side pings; clients and servers read the same variable, so the server always permits
the pings the clients send (see `server_options`).

Deadlines: a server binds each incoming call's deadline (`bind_deadline`, done by PrismServer);
every call on an `aio_channel` made while serving it (in its task, or in tasks it starts) gets
at most the caller's remaining time, so one request's deadline holds on every hop.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterable, Awaitable, Callable
from contextvars import ContextVar
from typing import Any

import grpc

from shared.rpc.logging import REQUEST_ID_KEY

MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # media items travel gateway -> encoder in one message
KEEPALIVE_ENV = "PRISM_GRPC_KEEPALIVE_S"
DEFAULT_KEEPALIVE_S = 30.0


def keepalive_ms() -> int:
    raw = os.environ.get(KEEPALIVE_ENV, "").strip()
    try:
        seconds = float(raw) if raw else DEFAULT_KEEPALIVE_S
    except ValueError as exc:
        raise ValueError(f"{KEEPALIVE_ENV} must be a number of seconds, got {raw!r}") from exc
    if seconds <= 0:
        raise ValueError(f"{KEEPALIVE_ENV} must be positive, got {raw!r}")
    return max(int(seconds * 1000), 100)


def channel_options() -> list[tuple[str, int]]:
    # Keepalive on both sides so idle channels survive NAT/proxy timeouts and dead peers are
    # noticed.
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", keepalive_ms()),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # gRPC's default reconnect backoff grows to 120 s: a restarted backend would stay
        # "down" for minutes. Cap it so recovery is noticed within seconds.
        ("grpc.initial_reconnect_backoff_ms", 250),
        ("grpc.min_reconnect_backoff_ms", 250),
        ("grpc.max_reconnect_backoff_ms", 2_000),
    ]


def server_options() -> list[tuple[str, int]]:
    keepalive = keepalive_ms()
    return [
        # gRPC binds with SO_REUSEPORT by default: a second server on a busy port would "start"
        # and silently share traffic with the first. Fail to bind instead.
        ("grpc.so_reuseport", 0),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", keepalive),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        # The server answers pings closer together than this with GOAWAY "too_many_pings",
        # killing the connection (and the calls on it). Clients ping every `keepalive` ms of
        # silence: allow a third of that, so timer slack never counts as a strike.
        ("grpc.http2.min_ping_interval_without_data_ms", max(keepalive // 3, 50)),
        ("grpc.http2.max_pings_without_data", 0),
    ]


# Read once per process: the services are started with the environment they keep.
CHANNEL_OPTIONS = channel_options()
SERVER_OPTIONS = server_options()

# time.monotonic() by which the call being served must be done; None outside a served call.
_deadline: ContextVar[float | None] = ContextVar("prism_rpc_deadline", default=None)


def bind_deadline(remaining: float | None) -> None:
    """Record the deadline of the call being served (`context.time_remaining()`): None or an
    effectively infinite value mean the caller set none. Tasks the handler starts inherit it
    (asyncio copies the context): a task meant to outlive the call must be started outside it
    or call `bind_deadline(None)` first."""
    _deadline.set(None if remaining is None or remaining > 1e6 else time.monotonic() + remaining)


def call_timeout(timeout: float | None) -> float | None:
    """`timeout`, shortened to the served call's remaining time. Past the deadline it is a
    millisecond, not zero or negative: the call then fails with DEADLINE_EXCEEDED like any
    other late call instead of raising something unusual."""
    deadline = _deadline.get()
    if deadline is None:
        return timeout
    left = max(deadline - time.monotonic(), 0.001)
    return left if timeout is None else min(timeout, left)


def _clamped(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    timeout = call_timeout(details.timeout)
    if timeout == details.timeout:
        return details
    return grpc.aio.ClientCallDetails(
        details.method, timeout, details.metadata, details.credentials, details.wait_for_ready
    )


# grpc.aio files each interceptor under the first of the four kinds it is an instance of, so
# every kind needs an object of its own.
class _UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(
        self, continuation: Callable[..., Awaitable[Any]], details: Any, request: Any
    ) -> Any:
        return await continuation(_clamped(details), request)


class _UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(
        self, continuation: Callable[..., Awaitable[Any]], details: Any, request: Any
    ) -> Any:
        return await continuation(_clamped(details), request)


class _StreamUnary(grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(
        self,
        continuation: Callable[..., Awaitable[Any]],
        details: Any,
        requests: AsyncIterable[Any],
    ) -> Any:
        return await continuation(_clamped(details), requests)


class _StreamStream(grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(
        self,
        continuation: Callable[..., Awaitable[Any]],
        details: Any,
        requests: AsyncIterable[Any],
    ) -> Any:
        return await continuation(_clamped(details), requests)


def aio_channel(address: str) -> grpc.aio.Channel:
    """A channel whose calls get at most the served call's remaining time (`call_timeout`)."""
    interceptors = [_UnaryUnary(), _UnaryStream(), _StreamUnary(), _StreamStream()]
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS, interceptors=interceptors)


def request_metadata(request_id: str) -> tuple[tuple[str, str], ...]:
    return ((REQUEST_ID_KEY, request_id),)
