"""OpenAI's error shape for every failure, and the FastAPI handlers that produce it.

`{"error": {"message", "type", "param", "code"}}`: pydantic errors become 400s (not FastAPI's
422), HTTP errors keep their status, PrismErrors carry their own, and anything unexpected is a
logged 500 in the same shape, never an HTML page or a traceback.
"""

from __future__ import annotations

from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared.errors import InvalidRequestError, ModelNotServedError, PrismError

log = structlog.get_logger("gateway")


class AuthenticationError(PrismError):
    http_status = 401
    error_type = "invalid_request_error"
    code = "invalid_api_key"


class ModelNotFoundError(ModelNotServedError):
    code = "model_not_found"


class PayloadTooLargeError(PrismError):
    http_status = 413
    error_type = "invalid_request_error"
    code = "payload_too_large"


class RequestTimeoutError(PrismError):
    """The client did not send its whole body in time (--body-timeout)."""

    http_status = 408
    error_type = "invalid_request_error"
    code = "request_timeout"


class GatewayTimeoutError(PrismError):
    http_status = 504
    error_type = "timeout"
    code = "timeout"


class BadGatewayError(PrismError):
    http_status = 502
    error_type = "server_error"
    code = "bad_gateway"


class ClientClosedError(PrismError):
    """The client went away before the answer was ready (nginx's 499, for the access log)."""

    http_status = 499
    error_type = "invalid_request_error"
    code = "client_closed_request"


class RetryLaterError(PrismError):
    """The decoder's queue is full (RESOURCE_EXHAUSTED): 429 with Retry-After."""

    http_status = 429
    error_type = "rate_limit_error"
    code = "overloaded"

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def error_body(
    message: str, type_: str, param: str | None = None, code: str | int | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def prism_error_body(exc: PrismError) -> dict[str, Any]:
    return error_body(exc.message, exc.error_type, exc.param, getattr(exc, "code", None))


def error_response(
    status: int,
    message: str,
    type_: str,
    param: str | None = None,
    code: str | int | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(
        error_body(message, type_, param, code), status_code=status, headers=headers
    )


def prism_error_response(exc: PrismError) -> JSONResponse:
    headers = {}
    if isinstance(exc, RetryLaterError):
        headers["Retry-After"] = str(exc.retry_after)
    if isinstance(exc, AuthenticationError):
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(prism_error_body(exc), status_code=exc.http_status, headers=headers)


def validation_message(errors: list[Any]) -> tuple[str, str | None]:
    """First pydantic error -> ("param: message", "param")."""
    if not errors:
        return "invalid request", None
    err = errors[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    msg = err.get("msg", "invalid value")
    return (f"{param}: {msg}" if param else msg), param


def _type_for_status(status: int) -> str:
    return "invalid_request_error" if status < 500 else "server_error"


async def _on_prism_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, PrismError)
    return prism_error_response(exc)


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    message, param = validation_message(list(exc.errors()))
    return error_response(400, message, "invalid_request_error", param)


async def _on_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    return error_response(
        exc.status_code, detail, _type_for_status(exc.status_code), headers=exc.headers
    )


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled_exception", path=request.url.path, exc_info=exc)
    return error_response(500, "internal server error", "server_error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(PrismError, _on_prism_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected)


__all__ = [
    "AuthenticationError",
    "BadGatewayError",
    "ClientClosedError",
    "GatewayTimeoutError",
    "InvalidRequestError",
    "ModelNotFoundError",
    "PayloadTooLargeError",
    "RequestTimeoutError",
    "RetryLaterError",
    "error_body",
    "error_response",
    "install_error_handlers",
    "prism_error_body",
    "prism_error_response",
]
