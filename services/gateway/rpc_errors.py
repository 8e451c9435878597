"""A backend's gRPC status -> the PrismError (and so the HTTP status) the client sees."""

from __future__ import annotations

import grpc

from services.gateway.backends import Backend, BackendPools
from services.gateway.errors import (
    BadGatewayError,
    GatewayTimeoutError,
    ModelNotFoundError,
    RetryLaterError,
)
from shared.errors import (
    BackendUnavailableError,
    InvalidRequestError,
    MissingFeaturesError,
    PrismError,
)
from shared.rpc.interceptors import answered_by_service, error_param


def rpc_error(err: grpc.aio.AioRpcError, backend: Backend, pools: BackendPools) -> PrismError:
    """A backend's gRPC status -> the PrismError (and HTTP status) the client sees."""
    code, details = err.code(), err.details() or err.code().name
    if code == grpc.StatusCode.UNAVAILABLE:
        if not answered_by_service(err):  # the backend itself is gone, not something behind it
            pools.mark_down(backend, f"UNAVAILABLE: {details}")
        return BackendUnavailableError(f"{backend.kind} unavailable: {details}")
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        for key, value in err.trailing_metadata() or ():
            if key == MissingFeaturesError.metadata_key:
                return MissingFeaturesError([k for k in str(value).split(",") if k])
        return InvalidRequestError(details)
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE):
        return InvalidRequestError(details, param=error_param(err))
    if code == grpc.StatusCode.NOT_FOUND:
        return ModelNotFoundError(details, param="model")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return RetryLaterError(f"server overloaded: {details}", retry_after=1)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return GatewayTimeoutError("request timed out")
    return BadGatewayError(f"{backend.kind} failed: {code.name}: {details}")
