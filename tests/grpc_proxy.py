"""A transparent gRPC proxy for fault injection between real processes.

Forwards every call (any service, health checks included) to one target as raw bytes, with
the caller's metadata and remaining deadline, and hands back the target's status, details and
trailing metadata unchanged; a cancelled caller cancels the forwarded call. Tests arm
`before_call` to act at an exact point of a request's way (e.g. empty the cache just before
a Generate reaches the decoder) and read `calls` for what the target answered.

    proxy = GrpcProxy()            # listening already; forwards once `connect` names a target
    ... StackConfig(gateway_decoders=[proxy.address]) ...
    proxy.connect(stack.address("decoder"))
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2  # noqa: F401 - registers grpc.health.v1 in the pool
from prism.v1 import cache_pb2, decoder_pb2, encoder_pb2  # noqa: F401 - same, for prism.v1

from shared.rpc.channels import CHANNEL_OPTIONS

DEFAULT_TIMEOUT = 60.0  # for a caller that set no deadline
_HOP_BY_HOP = ("user-agent", "grpc-", ":")  # set by gRPC itself on the outgoing call


@dataclass(frozen=True)
class Call:
    method: str  # e.g. "/prism.v1.Decoder/Generate"
    code: grpc.StatusCode
    trailers: dict[str, str]


class GrpcProxy(grpc.GenericRpcHandler):
    def __init__(self, host: str = "127.0.0.1") -> None:
        self.calls: list[Call] = []
        # Called with the method name before each call is forwarded (raising fails the call).
        self.before_call: Callable[[str], None] | None = None
        self._channel: grpc.Channel | None = None
        self._lock = threading.Lock()
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="grpc-proxy"),
            handlers=[self],
            options=[("grpc.so_reuseport", 0)],
        )
        self.port = self._server.add_insecure_port(f"{host}:0")
        self.address = f"{host}:{self.port}"
        self._server.start()

    def connect(self, target: str) -> None:
        self._channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)

    def close(self) -> None:
        self._server.stop(grace=None)
        if self._channel is not None:
            self._channel.close()

    def calls_to(self, method: str) -> list[Call]:
        with self._lock:
            return [c for c in self.calls if c.method.endswith(method)]

    # ---- grpc.GenericRpcHandler --------------------------------------------------------------
    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method: str = details.method
        service_name, _, name = method.lstrip("/").partition("/")
        try:
            desc = descriptor_pool.Default().FindServiceByName(service_name).methods_by_name[name]
        except KeyError:
            return None  # UNIMPLEMENTED, as the target would say for an unknown method
        if desc.client_streaming and desc.server_streaming:
            return grpc.stream_stream_rpc_method_handler(self._streaming(method, stream_in=True))
        if desc.client_streaming:
            return grpc.stream_unary_rpc_method_handler(self._unary(method, stream_in=True))
        if desc.server_streaming:
            return grpc.unary_stream_rpc_method_handler(self._streaming(method, stream_in=False))
        return grpc.unary_unary_rpc_method_handler(self._unary(method, stream_in=False))

    # ---- forwarding ----------------------------------------------------------------------------
    def _prepare(self, method: str, context: grpc.ServicerContext) -> dict[str, Any]:
        if self._channel is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, "proxy: no target connected yet")
        if self.before_call is not None:
            self.before_call(method)
        metadata = _custom(context.invocation_metadata())
        remaining = context.time_remaining()
        timeout = DEFAULT_TIMEOUT if remaining is None or remaining > 1e6 else remaining
        return {"timeout": max(timeout, 0.001), "metadata": metadata}

    def _record(self, method: str, code: grpc.StatusCode, trailers: Any) -> None:
        with self._lock:
            self.calls.append(Call(method, code, {k: str(v) for k, v in _custom(trailers)}))

    def _fail(self, method: str, err: grpc.RpcError, context: grpc.ServicerContext) -> None:
        call: Any = err  # a grpc.Call as well as an RpcError
        self._record(method, call.code(), call.trailing_metadata())
        context.set_trailing_metadata(_custom(call.trailing_metadata()))
        context.abort(call.code(), call.details() or "")

    def _unary(self, method: str, *, stream_in: bool) -> Callable[[Any, Any], bytes]:
        def handle(request: Any, context: grpc.ServicerContext) -> bytes:
            kwargs = self._prepare(method, context)
            assert self._channel is not None
            stub = (self._channel.stream_unary if stream_in else self._channel.unary_unary)(method)
            try:
                reply, call = stub.with_call(request, **kwargs)
            except grpc.RpcError as err:
                self._fail(method, err, context)
                raise AssertionError("unreachable: abort raises") from err
            self._record(method, grpc.StatusCode.OK, call.trailing_metadata())
            context.set_trailing_metadata(_custom(call.trailing_metadata()))
            return reply

        return handle

    def _streaming(self, method: str, *, stream_in: bool) -> Callable[[Any, Any], Iterator[bytes]]:
        def handle(request: Any, context: grpc.ServicerContext) -> Iterator[bytes]:
            kwargs = self._prepare(method, context)
            assert self._channel is not None
            open_stream = self._channel.stream_stream if stream_in else self._channel.unary_stream
            call = open_stream(method)(request, **kwargs)
            context.add_callback(call.cancel)  # the caller went away: so does the forwarded call
            try:
                yield from call
            except grpc.RpcError as err:
                self._fail(method, err, context)
                return
            self._record(method, grpc.StatusCode.OK, call.trailing_metadata())
            context.set_trailing_metadata(_custom(call.trailing_metadata()))

        return handle


def _custom(metadata: Any) -> tuple[tuple[str, Any], ...]:
    """The application's metadata, without what gRPC sets itself on every call."""
    return tuple((k, v) for k, v in metadata or () if not k.startswith(_HOP_BY_HOP))


class OneShot:
    """`before_call` hook: run `action` on the first call to `method`, across all proxies that
    share this hook; `fired` counts how often it ran (0 or 1), `result` is what it returned."""

    def __init__(self, method: str, action: Callable[[], object]) -> None:
        self.method, self.action = method, action
        self.fired = 0
        self.result: object = None
        self._lock = threading.Lock()

    def __call__(self, method: str) -> None:
        if not method.endswith(self.method):
            return
        with self._lock:
            if self.fired:
                return
            self.fired += 1
            self.result = self.action()  # under the lock: the call waits until it is done
