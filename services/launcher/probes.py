"""Readiness probes with deadlines: gRPC health and the gateway's /ready, plus free ports.

Every wait polls a real signal (never a fixed sleep) and gives up early when the process it
waits for has exited, so a crash at start-up is reported at once with the child's log.
"""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


class StackError(RuntimeError):
    """A component failed to start, or died."""


def port_taken(host: str, port: int) -> bool:
    """True when something listens on `port`: checked before starting anything, so a second
    stack fails at once with a clear message instead of half-starting."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def grpc_health(address: str, timeout: float = 1.0) -> int | None:
    """The overall health status of the server at `address`, or None when unreachable."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout
            )
        except grpc.RpcError:
            return None
    return reply.status


def http_status(url: str, timeout: float = 1.0, api_key: str | None = None) -> int | None:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        request = urllib.request.Request(url, headers=headers)
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return None


def wait_until(
    what: str,
    ready: Callable[[], bool],
    alive: Callable[[], bool],
    deadline: float,
    on_failure: Callable[[], str],
) -> None:
    """Poll `ready` (backing off to 0.5 s) until it holds; raise StackError when the process
    exits first (`alive` false) or the monotonic `deadline` passes."""
    delay = 0.05
    while True:
        if ready():
            return
        if not alive():
            raise StackError(f"{what} exited during start-up:\n{on_failure()}")
        if time.monotonic() > deadline:
            raise StackError(f"{what} was not ready in time:\n{on_failure()}")
        time.sleep(delay)
        delay = min(delay * 2, 0.5)


def connect_host(host: str) -> str:
    """Where to reach a server bound to `host` (a wildcard bind is reached on loopback)."""
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


SERVING = health_pb2.HealthCheckResponse.SERVING
