"""Test doubles for the gateway: fake Encoder/Decoder gRPC servers with canned, deterministic
answers, a loopback HTTP canary for media fetches, and uvicorn in a background thread.

Everything binds 127.0.0.1 on a free port; nothing here ever talks to another host.
"""

from __future__ import annotations

import hashlib
import http.server
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent import futures
from typing import Any

import grpc
import uvicorn
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prism.v1 import (
    cache_pb2,
    common_pb2,
    decoder_pb2,
    decoder_pb2_grpc,
    encoder_pb2,
    encoder_pb2_grpc,
)

MODALITY = {"text": 1, "image": 2, "video": 3, "audio": 4}


def model_info(
    model_id: str, modalities: Sequence[str] = ("text", "image")
) -> common_pb2.ModelInfo:
    mods = [MODALITY[m] for m in modalities]
    return common_pb2.ModelInfo(
        id=model_id, family="fake", modalities=mods, max_context_tokens=4096
    )


class FakeEncoder(encoder_pb2_grpc.EncoderServicer):
    def __init__(self, models: list[common_pb2.ModelInfo]) -> None:
        self.models = models
        self.calls: list[encoder_pb2.EncodeRequest] = []

    def Encode(
        self, request: encoder_pb2.EncodeRequest, context: Any
    ) -> encoder_pb2.EncodeResponse:
        self.calls.append(request)
        items = []
        for item in request.items:
            key = hashlib.sha256(item.data + request.tenant.encode()).hexdigest()
            ref = common_pb2.MediaFeatureRef(
                content_key=key, modality=item.modality, num_tokens=4, grid=[1, 4, 4]
            )
            items.append(encoder_pb2.EncodedItem(ref=ref))
        return encoder_pb2.EncodeResponse(items=items)

    def ListModels(self, request: Any, context: Any) -> common_pb2.ListModelsResponse:
        return common_pb2.ListModelsResponse(models=self.models)


class FakeDecoder(decoder_pb2_grpc.DecoderServicer):
    """Streams `pieces` (default "Hello from <name>") one delta each, then a Finish."""

    def __init__(self, name: str, models: list[common_pb2.ModelInfo]) -> None:
        self.name, self.models = name, models
        self.pieces: list[str] = ["Hello", " from", f" {name}"]
        self.delay = 0.0  # seconds before each delta
        self.requests: list[decoder_pb2.GenerateRequest] = []
        self.missing_once = False  # fail the next media request with missing-feature metadata
        self.overloaded = False
        self.cancelled = threading.Event()
        # When set, streamed as is instead of `pieces` (reasoning, tool calls, custom finishes).
        self.script: list[decoder_pb2.GenerateResponse] | None = None
        self.cached_tokens = 2  # Finish.usage.cached_prompt_tokens
        # PrefixCacheStats answers this; PrefixCacheReset answers `removed_blocks` and counts.
        self.prefix_stats = prefix_stats(seed=1)
        self.removed_blocks = 7
        self.resets = 0

    def Generate(self, request: decoder_pb2.GenerateRequest, context: Any) -> Iterator[Any]:
        self.requests.append(request)
        if self.overloaded:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")
        keys = [
            p.media.content_key
            for m in request.messages.messages
            for p in m.content
            if p.HasField("media")
        ]
        if self.missing_once and keys:
            self.missing_once = False
            context.set_trailing_metadata((("prism-missing-feature-keys", ",".join(keys)),))
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "features not in cache")
        state = {"finished": False}
        context.add_callback(lambda: state["finished"] or self.cancelled.set())
        if self.script is not None:
            yield from self.script
            return
        limit = request.stop.max_tokens or len(self.pieces)
        pieces = self.pieces[:limit]
        for i, piece in enumerate(pieces):
            if self.delay:
                time.sleep(self.delay)
            if not context.is_active():
                return
            yield decoder_pb2.GenerateResponse(delta=decoder_pb2.Delta(text=piece, token_ids=[i]))
        reason = (
            decoder_pb2.FINISH_REASON_LENGTH
            if len(pieces) < len(self.pieces)
            else decoder_pb2.FINISH_REASON_STOP
        )
        usage = common_pb2.Usage(
            prompt_tokens=10 + 4 * len(keys),
            completion_tokens=len(pieces),
            cached_prompt_tokens=self.cached_tokens,
        )
        state["finished"] = True
        # Fixed, distinct timings: the gateway's phase histograms must report exactly these.
        ms = 1_000_000
        timings = decoder_pb2.Timings(
            queue_ns=ms, feature_fetch_ns=2 * ms, prefill_ns=3 * ms, decode_ns=4 * ms
        )
        finish = decoder_pb2.Finish(reason=reason, usage=usage, timings=timings)
        yield decoder_pb2.GenerateResponse(finish=finish)

    def ListModels(self, request: Any, context: Any) -> common_pb2.ListModelsResponse:
        return common_pb2.ListModelsResponse(models=self.models)

    def PrefixCacheStats(self, request: Any, context: Any) -> decoder_pb2.PrefixCacheStatsResponse:
        return self.prefix_stats

    def PrefixCacheReset(self, request: Any, context: Any) -> decoder_pb2.PrefixCacheResetResponse:
        self.resets += 1
        return decoder_pb2.PrefixCacheResetResponse(removed_blocks=self.removed_blocks)


def prefix_stats(seed: int, block_size: int = 16) -> decoder_pb2.PrefixCacheStatsResponse:
    """Distinct, known APC numbers (each a multiple of `seed`), so sums are checkable."""
    memory = cache_pb2.TierStats(
        entries=5 * seed,
        bytes=600 * seed,
        capacity_bytes=1000 * seed,
        hits=7 * seed,
        evictions=seed,
    )
    return decoder_pb2.PrefixCacheStatsResponse(
        enabled=True,
        block_size=block_size,
        queries=3 * seed,
        query_tokens=100 * seed,
        matched_tokens=48 * seed,
        memory_hits=2 * seed,
        remote_hits=seed,
        misses=4 * seed,
        memory=memory,
        blocks_written=9 * seed,
    )


class FakeServer:
    """A sync grpc server on 127.0.0.1 hosting one fake servicer plus grpc.health.v1."""

    def __init__(self, servicer: FakeEncoder | FakeDecoder) -> None:
        self.servicer = servicer
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if isinstance(servicer, FakeEncoder):
            encoder_pb2_grpc.add_EncoderServicer_to_server(servicer, self.server)
        else:
            decoder_pb2_grpc.add_DecoderServicer_to_server(servicer, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{self.port}"
        self.server.start()
        self.set_serving(True)

    def set_serving(self, serving: bool) -> None:
        s = health_pb2.HealthCheckResponse
        self.health.set("", s.SERVING if serving else s.NOT_SERVING)

    def stop(self) -> None:
        self.server.stop(grace=None)


class GatewayThread:
    """uvicorn serving an app in a daemon thread (its own event loop), on a free port."""

    def __init__(self, app: Any) -> None:
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.port = 0

    def start(self, timeout: float = 20.0) -> GatewayThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("gateway did not start")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


class CanaryServer:
    """Loopback HTTP server: GET /<name> serves files[name]; GET /redirect?to=URL answers 302."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files, self.hits = files, []
        canary = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                canary.hits.append(self.path)
                if self.path.startswith("/redirect?to="):
                    self.send_response(302)
                    self.send_header("Location", self.path.split("=", 1)[1])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = canary.files.get(self.path.lstrip("/"))
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class FakeStack:
    """Fake backends plus a real gateway in front of them."""

    def __init__(
        self, encoders: list[FakeServer], decoders: list[FakeServer], **overrides: Any
    ) -> None:
        from services.gateway.app import create_app
        from services.gateway.config import GatewayConfig

        self.encoders, self.decoders = encoders, decoders
        self.config = GatewayConfig(
            encoders=[e.address for e in encoders],
            decoders=[d.address for d in decoders],
            health_interval=0.2,
            **overrides,
        )
        self.app = create_app(self.config)
        self.gateway = GatewayThread(self.app).start()
        self.url = self.gateway.url

    def stop(self) -> None:
        self.gateway.stop()
        for server in (*self.encoders, *self.decoders):
            server.stop()
