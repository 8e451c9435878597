"""Serve a gRPC service the Prism way: health, reflection, the interceptor, graceful SIGTERM.

On SIGTERM/SIGINT every health status turns NOT_SERVING (load balancers and the gateway stop
sending work), in-flight calls get `grace` seconds to finish, then the server stops.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from shared.rpc.channels import SERVER_OPTIONS, bind_deadline
from shared.rpc.interceptors import ServiceInterceptor, is_infrastructure

log = structlog.get_logger("server")

AddServicers = Callable[[grpc.aio.Server], Sequence[str]]


class DeadlineInterceptor(grpc.aio.ServerInterceptor):
    """Binds each call's deadline before its handler runs, so the calls the handler makes
    downstream (on `aio_channel`s) carry the caller's remaining time (`bind_deadline`)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        # Health and reflection call nothing downstream (and Watch is no async generator).
        if handler is None or is_infrastructure(details.method):
            return handler
        if handler.unary_unary:
            return handler._replace(unary_unary=_bind_unary(handler.unary_unary))
        if handler.stream_unary:
            return handler._replace(stream_unary=_bind_unary(handler.stream_unary))
        if handler.unary_stream:
            return handler._replace(unary_stream=_bind_stream(handler.unary_stream))
        return handler._replace(stream_stream=_bind_stream(handler.stream_stream))


def _bind_unary(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
        bind_deadline(context.time_remaining())
        return await fn(request, context)

    return wrapper


def _bind_stream(fn: Callable[..., AsyncGenerator[Any, None]]) -> Callable[..., Any]:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        bind_deadline(context.time_remaining())
        stream = fn(request, context)
        try:
            async for item in stream:
                yield item
        finally:
            await stream.aclose()  # closed with us (a cancelled call), not whenever GC runs

    return wrapper


class PrismServer:
    """Owns one grpc.aio server and its health servicer."""

    def __init__(self, add_servicers: AddServicers, *, grace: float = 30.0) -> None:
        self.grace = grace
        self.server = grpc.aio.server(
            interceptors=[ServiceInterceptor(), DeadlineInterceptor()], options=SERVER_OPTIONS
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.service_names = list(add_servicers(self.server))
        reflection.enable_server_reflection(
            [*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server
        )
        self._stopping = asyncio.Event()

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ["", *self.service_names]:
            await self.health.set(name, status)

    async def start(self, address: str) -> int:
        try:
            port = self.server.add_insecure_port(address)
        except RuntimeError as exc:  # grpc's "Failed to bind": usually the port is taken
            raise OSError(f"could not bind {address} (port in use?)") from exc
        if port == 0:
            raise OSError(f"could not bind {address}")
        await self.server.start()
        await self.set_serving(True)
        log.info("serving", address=address, port=port, services=self.service_names)
        return port

    def request_stop(self) -> None:
        self._stopping.set()

    async def wait(self) -> None:
        """Run until SIGTERM/SIGINT, then drain gracefully."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        await self._stopping.wait()
        log.info("draining", grace_s=self.grace)
        # NOT_SERVING everywhere, and open health Watch streams end now instead of at the grace.
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.grace)
        log.info("stopped")
