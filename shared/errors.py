"""Errors that are part of the API: each maps to one gRPC status and one HTTP status.

Engines raise these; the gRPC exception interceptor and the gateway translate them, so a bad
request is never a traceback and never a 500.
"""

from __future__ import annotations


class PrismError(Exception):
    grpc_code = "INTERNAL"
    http_status = 500
    error_type = "server_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequestError(PrismError, ValueError):
    grpc_code = "INVALID_ARGUMENT"
    http_status = 400
    error_type = "invalid_request_error"


class ModelNotServedError(PrismError):
    grpc_code = "NOT_FOUND"
    http_status = 404
    error_type = "invalid_request_error"


class MissingFeaturesError(PrismError):
    """Media features were not in the cache: the caller re-encodes them and retries once."""

    grpc_code = "FAILED_PRECONDITION"
    http_status = 503
    error_type = "server_error"
    metadata_key = "prism-missing-feature-keys"

    def __init__(self, keys: list[str]) -> None:
        super().__init__(f"media features not in the cache: {', '.join(keys)}")
        self.keys = keys


class OverloadedError(PrismError):
    grpc_code = "RESOURCE_EXHAUSTED"
    http_status = 429
    error_type = "rate_limit_error"


class BackendUnavailableError(PrismError):
    grpc_code = "UNAVAILABLE"
    http_status = 503
    error_type = "server_error"


class DeadlineExceededError(PrismError):
    """The request's own deadline passed while this service waited on another: the caller
    answers 504, as when its own deadline fires first (which of the two ends first is a race)."""

    grpc_code = "DEADLINE_EXCEEDED"
    http_status = 504
    error_type = "timeout"
