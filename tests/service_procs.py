"""Service subprocesses for tests: free loopback ports, start, wait for grpc health SERVING.

Never sleep-and-hope: `start_service` polls `grpc.health.v1` until SERVING, and fails fast with
the process's log when it exits first.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.rpc.ports import free_port

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Service:
    name: str
    port: int
    proc: subprocess.Popen
    log: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self) -> int:
        """SIGTERM (graceful drain); the exit code, which is 0 for a clean shutdown."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def spawn(module: str, args: list[str], log_dir: Path, port: int | None = None) -> Service:
    port = port or free_port()
    log = log_dir / f"{module.rsplit('.', 1)[-1]}-{port}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", module, "--port", str(port), "--grace", "1", *args],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=log.open("w"),
    )
    return Service(module, port, proc, log)


def wait_serving(service: Service, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(service.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if service.proc.poll() is not None:
                raise RuntimeError(f"{service.name} exited early:\n{service.logs()}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)  # poll interval, not a guess at readiness
    service.stop()
    raise TimeoutError(f"{service.name} not SERVING after {timeout}s:\n{service.logs()}")


def start_all(specs: list[tuple[str, list[str], int]], log_dir: Path) -> list[Service]:
    """Start several services at once (module, args, port from `free_port`), so their slow
    imports overlap, then wait for each to be SERVING."""
    services = [spawn(module, args, log_dir, port) for module, args, port in specs]
    try:
        for service in services:
            wait_serving(service)
    except BaseException:
        for service in services:
            service.stop()
        raise
    return services
