"""Gateway settings: one dataclass, filled from flags, each flag falling back to an env var."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

MiB = 1024 * 1024


@dataclass
class GatewayConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    encoders: list[str] = field(default_factory=list)
    decoders: list[str] = field(default_factory=list)
    # Cache service, for /v1/cache/stats and /v1/cache/reset only; None: those report the
    # decoders alone (generation never goes through the gateway's cache connection).
    cache: str | None = None
    api_key: str | None = None
    # Local media paths are refused unless they resolve under this directory.
    allowed_local_media_path: str | None = None
    max_images_per_request: int = 5
    max_media_per_request: int = 5  # video and audio items together
    max_image_bytes: int = 10 * MiB
    max_image_pixels: int = 50_000_000
    # Per video / audio item (images have their own cap).
    max_media_bytes: int = 50 * MiB
    max_body_bytes: int = 50 * MiB
    # Seconds a client has to send its whole request body (slow or stalled uploads are cut: 408).
    body_timeout: float = 60.0
    # Connect and read timeout of a media fetch; the whole fetch gets three times this.
    fetch_timeout: float = 10.0
    max_redirects: int = 5
    # DANGEROUS: addresses or networks media fetches may reach although the SSRF policy refuses
    # them (loopback, private...). Meant for tests against a local canary server only.
    allow_fetch_from: list[str] = field(default_factory=list)
    # Deadline of each request's gRPC calls, counted from arrival.
    request_timeout: float = 600.0
    health_interval: float = 2.0
    # On SIGTERM: seconds in-flight streams get to finish before the process exits.
    grace: float = 30.0
    log_level: str = "INFO"


def _split(value: str | list[str] | None) -> list[str]:
    """Comma-separated and/or repeated flag values -> one flat list."""
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    return [part.strip() for item in items for part in item.split(",") if part.strip()]


def _env(name: str, default: object = None) -> object:
    return os.environ.get(name, default)


def build_parser() -> argparse.ArgumentParser:
    d = GatewayConfig()
    p = argparse.ArgumentParser(
        prog="python -m services.gateway", description="Prism OpenAI-compatible HTTP gateway."
    )

    def add(flag: str, env: str, help_: str, default: object = None, **kw: object) -> None:
        shown = "" if default is None else f" (default {default})"
        p.add_argument(flag, default=_env(env, default), help=f"{help_}{shown} [{env}]", **kw)

    add("--host", "PRISM_GATEWAY_HOST", "bind address", d.host)
    add("--port", "PRISM_GATEWAY_PORT", "HTTP port", d.port, type=int)
    # Repeatable and comma-separated; the env var is read in config_from_args when unset.
    p.add_argument("--encoder", action="append", help="encoder host:port[,...] [PRISM_ENCODERS]")
    p.add_argument("--decoder", action="append", help="decoder host:port[,...] [PRISM_DECODERS]")
    add(
        "--cache",
        "PRISM_CACHE_ADDR",
        "cache service host:port, for /v1/cache/stats and /v1/cache/reset (optional)",
    )
    add("--api-key", "PRISM_API_KEY", "require 'Authorization: Bearer KEY' (all but /health)")
    add(
        "--allowed-local-media-path",
        "PRISM_ALLOWED_LOCAL_MEDIA_PATH",
        "directory local media paths must resolve under (unset: local paths refused)",
    )
    add(
        "--max-images-per-request",
        "PRISM_MAX_IMAGES_PER_REQUEST",
        "images per request",
        d.max_images_per_request,
        type=int,
    )
    add(
        "--max-media-per-request",
        "PRISM_MAX_MEDIA_PER_REQUEST",
        "video and audio items per request",
        d.max_media_per_request,
        type=int,
    )
    add(
        "--max-image-bytes", "PRISM_MAX_IMAGE_BYTES", "bytes per image", d.max_image_bytes, type=int
    )
    add(
        "--max-image-pixels",
        "PRISM_MAX_IMAGE_PIXELS",
        "width*height per image, checked from the header before decoding",
        d.max_image_pixels,
        type=int,
    )
    add(
        "--max-media-bytes",
        "PRISM_MAX_MEDIA_BYTES",
        "bytes per video/audio item",
        d.max_media_bytes,
        type=int,
    )
    add(
        "--max-body-bytes", "PRISM_MAX_BODY_BYTES", "request body bytes", d.max_body_bytes, type=int
    )
    add(
        "--body-timeout",
        "PRISM_BODY_TIMEOUT",
        "seconds to receive a whole request body (else 408)",
        d.body_timeout,
        type=float,
    )
    add(
        "--fetch-timeout",
        "PRISM_FETCH_TIMEOUT",
        "media URL connect/read timeout, seconds (whole fetch: 3x)",
        d.fetch_timeout,
        type=float,
    )
    add("--max-redirects", "PRISM_MAX_REDIRECTS", "redirect hops", d.max_redirects, type=int)
    p.add_argument(
        "--allow-fetch-from",
        action="append",
        help="DANGEROUS, tests only: IPs/CIDRs media fetches may reach although the SSRF policy "
        "refuses them (e.g. 127.0.0.1 for a local canary) [PRISM_ALLOW_FETCH_FROM]",
    )
    add(
        "--request-timeout",
        "PRISM_REQUEST_TIMEOUT",
        "deadline of each request's gRPC calls, seconds",
        d.request_timeout,
        type=float,
    )
    add(
        "--health-interval",
        "PRISM_HEALTH_INTERVAL",
        "seconds between backend health checks",
        d.health_interval,
        type=float,
    )
    add("--grace", "PRISM_GRACE", "seconds in-flight requests get on SIGTERM", d.grace, type=float)
    add("--log-level", "PRISM_LOG_LEVEL", "log level", d.log_level)
    return p


def config_from_args(argv: list[str] | None = None) -> GatewayConfig:
    a = build_parser().parse_args(argv)
    return GatewayConfig(
        host=a.host,
        port=int(a.port),
        encoders=_split(a.encoder if a.encoder else _env("PRISM_ENCODERS")),
        decoders=_split(a.decoder if a.decoder else _env("PRISM_DECODERS")),
        cache=a.cache or None,
        api_key=a.api_key or None,
        allowed_local_media_path=a.allowed_local_media_path or None,
        max_images_per_request=int(a.max_images_per_request),
        max_media_per_request=int(a.max_media_per_request),
        max_image_bytes=int(a.max_image_bytes),
        max_image_pixels=int(a.max_image_pixels),
        max_media_bytes=int(a.max_media_bytes),
        max_body_bytes=int(a.max_body_bytes),
        body_timeout=float(a.body_timeout),
        fetch_timeout=float(a.fetch_timeout),
        max_redirects=int(a.max_redirects),
        allow_fetch_from=_split(
            a.allow_fetch_from if a.allow_fetch_from else _env("PRISM_ALLOW_FETCH_FROM")
        ),
        request_timeout=float(a.request_timeout),
        health_interval=float(a.health_interval),
        grace=float(a.grace),
        log_level=str(a.log_level),
    )
