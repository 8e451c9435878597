"""The FastAPI app: routes (each also without the /v1 prefix), lifespan, middleware, errors."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import structlog
from fastapi import Depends, FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response

from services.gateway import openapi_doc as D
from services.gateway import schemas as S
from services.gateway.auth import api_key_dependency
from services.gateway.backends import BackendPools
from services.gateway.cache_admin import (
    ADMIN_TIMEOUT,
    CacheResetBody,
    CacheService,
    cache_reset,
    cache_stats,
)
from services.gateway.chat import chat_completions
from services.gateway.config import GatewayConfig
from services.gateway.errors import error_body, install_error_handlers
from services.gateway.fetch import MediaFetcher
from services.gateway.media import MediaLoader
from services.gateway.metrics import GatewayMetrics
from services.gateway.middleware import RequestContextMiddleware
from services.gateway.pipeline import Pipeline
from services.gateway.responses import create_response

log = structlog.get_logger("gateway")


def _pools(request: Request) -> BackendPools:
    return request.app.state.pools


async def health() -> dict[str, str]:
    """The process is up (no backend is consulted)."""
    return {"status": "ok"}


async def ready(request: Request) -> JSONResponse:
    """200 when every configured backend is SERVING, else 503 naming those that are not."""
    pools = _pools(request)
    ok, down = pools.ready()
    if ok:
        return JSONResponse({"status": "ready", "backends": pools.status()})
    body = error_body("not ready: " + "; ".join(down), "server_error", code="not_ready")
    body.update(status="not ready", down=down, backends=pools.status())
    return JSONResponse(body, status_code=503)


async def list_models(request: Request) -> dict[str, Any]:
    pools, created = _pools(request), request.app.state.started
    data = []
    for model_id, info in sorted(pools.models().items()):
        item: dict[str, Any] = {
            "id": model_id,
            "object": "model",
            "created": created,
            "owned_by": "prism",
            "modalities": pools.modality_names(info),
        }
        if info.max_context_tokens:
            item["max_model_len"] = info.max_context_tokens
        if info.random_weights:
            item["random_weights"] = True
        data.append(item)
    return {"object": "list", "data": data}


async def metrics(request: Request) -> Response:
    content, content_type = request.app.state.metrics.render()
    return Response(content, media_type=content_type)


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document plus the schemas the route declarations name, and the bearer scheme."""
    if app.openapi_schema is None:
        doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
        components = doc.setdefault("components", {})
        schemas = components.setdefault("schemas", {})
        for name, schema in D.openapi_components(
            S.ChatCompletionRequest, S.ResponsesRequest, CacheResetBody
        ).items():
            if schemas.get(name, schema) != schema:
                raise ValueError(f"two different schemas named {name}")
            schemas[name] = schema
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        app.openapi_schema = doc
    return app.openapi_schema


def create_app(
    config: GatewayConfig,
    backends: BackendPools | None = None,
    *,
    fetcher: MediaFetcher | None = None,
) -> FastAPI:
    """The gateway app. Backends (gRPC channels) start in the lifespan, inside the server's loop."""
    pools = backends or BackendPools(
        config.encoders, config.decoders, interval=config.health_interval
    )
    gateway_metrics = GatewayMetrics()
    gateway_metrics.watch_decoders(lambda: pools.backends)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        fetch = fetcher or MediaFetcher(
            allow=config.allow_fetch_from,
            timeout=config.fetch_timeout,
            max_redirects=config.max_redirects,
        )
        loader = MediaLoader(config, fetch)
        app.state.fetcher = fetch
        app.state.pipeline = Pipeline(config, pools, loader, gateway_metrics)
        app.state.cache = CacheService(config.cache, ADMIN_TIMEOUT) if config.cache else None
        if app.state.cache is None:
            # Every real deployment has one (encoders and decoders need it): likely an oversight.
            log.warning("cache_service_not_configured", hint="--cache / PRISM_CACHE_ADDR")
        await pools.start()
        try:
            yield
        finally:
            await pools.close()
            await fetch.aclose()
            if app.state.cache is not None:
                await app.state.cache.close()

    app = FastAPI(
        title="Prism gateway", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.config, app.state.pools, app.state.metrics = config, pools, gateway_metrics
    app.state.started = int(time.time())
    app.state.cache = None  # the lifespan opens the channel, inside the serving loop
    install_error_handlers(app)
    app.add_middleware(
        RequestContextMiddleware,
        max_body_bytes=config.max_body_bytes,
        metrics=gateway_metrics,
        body_timeout=config.body_timeout,
    )
    auth = [Depends(api_key_dependency(config.api_key))]
    routes = [
        ("/chat/completions", chat_completions, "POST"),
        ("/responses", create_response, "POST"),
        ("/cache/stats", cache_stats, "GET"),
        ("/cache/reset", cache_reset, "POST"),
        ("/models", list_models, "GET"),
        ("/ready", ready, "GET"),
        ("/metrics", metrics, "GET"),
    ]
    for prefix in ("/v1", ""):
        for path, endpoint, method in routes:
            # D.route_openapi: what the route takes and answers, for the OpenAPI document
            # (the handlers parse their bodies themselves, so FastAPI can infer none of it).
            app.add_api_route(
                prefix + path,
                endpoint,
                methods=[method],
                dependencies=auth,
                **D.route_openapi(path),
            )
        app.add_api_route(f"{prefix}/health", health, methods=["GET"], **D.route_openapi("/health"))
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app
