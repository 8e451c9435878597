"""One server interceptor: binds the request id for logging, times each call, and maps
exceptions to gRPC status codes (TGI's pattern), so servicers stay thin.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import structlog

from shared.errors import MissingFeaturesError, PrismError
from shared.rpc.logging import REQUEST_ID_KEY

log = structlog.get_logger("rpc")


def _request_id(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY:
            return value
    return uuid.uuid4().hex


# Trailing metadata on every status a servicer chose: the process answered, so a caller can tell
# "this service is up but something behind it is not" (UNAVAILABLE with it) from a dead peer.
ORIGIN_KEY, ORIGIN_SERVICE = "prism-error-origin", "service"
PARAM_KEY = "prism-error-param"  # the request field an error names, for OpenAI's `param`


def answered_by_service(err: grpc.aio.AioRpcError) -> bool:
    return (ORIGIN_KEY, ORIGIN_SERVICE) in tuple(err.trailing_metadata() or ())


def error_param(err: grpc.aio.AioRpcError) -> str | None:
    return next((str(v) for k, v in err.trailing_metadata() or () if k == PARAM_KEY), None)


async def _abort(context: grpc.aio.ServicerContext, exc: Exception, method: str) -> None:
    trailing = [(ORIGIN_KEY, ORIGIN_SERVICE)]
    if isinstance(exc, MissingFeaturesError):
        trailing.append((exc.metadata_key, ",".join(exc.keys)))
    if isinstance(exc, PrismError) and exc.param:
        trailing.append((PARAM_KEY, exc.param))
    context.set_trailing_metadata(tuple(trailing))
    if isinstance(exc, PrismError):
        # A cache miss (NOT_FOUND) is an answer, not a refusal worth a log line at info.
        level = log.debug if exc.grpc_code == "NOT_FOUND" else log.info
        level("rpc_refused", method=method, code=exc.grpc_code, error=exc.message)
        await context.abort(getattr(grpc.StatusCode, exc.grpc_code), exc.message)
    log.exception("rpc_failed", method=method)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")


def _wrap_unary(fn: Callable[..., Awaitable[Any]], method: str) -> Callable[..., Awaitable[Any]]:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
        structlog.contextvars.bind_contextvars(request_id=_request_id(context))
        start = time.perf_counter()
        try:
            return await fn(request, context)
        except (grpc.aio.AbortError, grpc.aio.UsageError):
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to a status, never leaked
            await _abort(context, exc, method)
        finally:
            log.debug("rpc_done", method=method, ms=round((time.perf_counter() - start) * 1e3, 2))

    return wrapper


def _wrap_stream(fn: Callable[..., AsyncIterator[Any]], method: str) -> Callable[..., Any]:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        structlog.contextvars.bind_contextvars(request_id=_request_id(context))
        start = time.perf_counter()
        try:
            async for item in fn(request, context):
                yield item
        except (grpc.aio.AbortError, grpc.aio.UsageError):
            raise
        except Exception as exc:  # noqa: BLE001
            await _abort(context, exc, method)
        finally:
            log.debug("rpc_done", method=method, ms=round((time.perf_counter() - start) * 1e3, 2))

    return wrapper


def is_infrastructure(method: str) -> bool:
    """Health and reflection: no request id, nothing downstream, not worth wrapping."""
    return method.startswith(("/grpc.health", "/grpc.reflection"))


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or is_infrastructure(details.method):
            return handler
        method = details.method
        if handler.unary_unary:
            return handler._replace(unary_unary=_wrap_unary(handler.unary_unary, method))
        if handler.stream_unary:
            return handler._replace(stream_unary=_wrap_unary(handler.stream_unary, method))
        if handler.unary_stream:
            return handler._replace(unary_stream=_wrap_stream(handler.unary_stream, method))
        return handler._replace(stream_stream=_wrap_stream(handler.stream_stream, method))
