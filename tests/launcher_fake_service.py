"""A stand-in for any Prism service, for the launcher's unit tests (no model, starts fast).

gRPC health for cache/encoder/decoder, HTTP /ready for the gateway (`--role gateway`).
Behaviour switches (env): FAKE_FAIL=<role> exits 3 at start; FAKE_IGNORE_TERM=<role> ignores
SIGTERM (the launcher must SIGKILL it); FAKE_READY_AFTER=<seconds> reports NOT_SERVING / 503
that long first.
"""

from __future__ import annotations

import argparse
import http.server
import os
import signal
import sys
import threading
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc


def _grpc(host: str, port: int, ready_at: float, stop: threading.Event) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    server.add_insecure_port(f"{host}:{port}")
    server.start()
    while not stop.wait(0.05):
        if time.monotonic() >= ready_at:
            servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    server.stop(0)


def _http(host: str, port: int, ready_at: float, stop: threading.Event) -> None:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            ok = self.path == "/health" or time.monotonic() >= ready_at
            self.send_response(200 if ok else 503)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    stop.wait()
    server.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--role", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args, rest = parser.parse_known_args()
    print(f"fake {args.role} pid {os.getpid()} args {rest}", flush=True)
    if os.environ.get("FAKE_FAIL") == args.role:
        print(f"fake {args.role}: failing on purpose", flush=True)
        sys.exit(3)
    stop = threading.Event()
    if os.environ.get("FAKE_IGNORE_TERM") == args.role:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
    ready_at = time.monotonic() + float(os.environ.get("FAKE_READY_AFTER", "0"))
    serve = _http if args.role == "gateway" else _grpc
    serve(args.host, args.port, ready_at, stop)
    print(f"fake {args.role} stopped", flush=True)


if __name__ == "__main__":
    main()
