"""Command-line flags that also read environment variables (flag wins over env over default)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Awaitable, Callable

from shared.rpc.logging import configure_logging


def env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def env_list(name: str) -> list[str]:
    """A comma-separated env var as a list (empty when unset)."""
    return [v.strip() for v in (env(name) or "").split(",") if v.strip()]


def add_server_flags(parser: argparse.ArgumentParser, default_port: int) -> None:
    """--host, --port, --cache, --dtype, --grace, --log-level, shared by encoder and decoder."""
    parser.add_argument("--host", default=env("PRISM_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(env("PRISM_PORT", str(default_port))))
    parser.add_argument(
        "--cache",
        default=env("PRISM_CACHE_ADDR", "127.0.0.1:50053"),
        help="cache service address [PRISM_CACHE_ADDR]",
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=env("PRISM_DTYPE"),
        help="cast floating-point weights (default: as stored; float32 on the CPU backend"
        " with MKL) [PRISM_DTYPE]",
    )
    parser.add_argument("--grace", type=float, default=float(env("PRISM_GRACE", "30")))
    parser.add_argument("--log-level", default=env("PRISM_LOG_LEVEL", "INFO"))


def run_service(
    name: str, serve: Callable[[argparse.Namespace], Awaitable[None]], args: argparse.Namespace
) -> int:
    """Log as `name`, serve until SIGTERM/SIGINT. Start-up failures (port in use, model missing,
    bad flags) are one line on stderr and exit code 2, not a traceback."""
    configure_logging(name, args.log_level)
    try:
        asyncio.run(serve(args))
    except (OSError, ValueError) as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
    return 0
