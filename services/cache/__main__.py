"""`python -m services.cache`: serve the tiered tensor cache over gRPC.

Logs one JSON line per event on stderr; the `serving` line carries the bound port, which is how
callers that pass `--port 0` learn it. SIGTERM: health NOT_SERVING, in-flight calls get
`--grace` seconds, queued disk writes are flushed, exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys

import structlog

from services.cache.disk import DiskStore
from services.cache.servicer import add_cache_servicer
from services.cache.store import MemoryStore
from services.cache.tiered import TieredStore
from services.common.flags import env, run_service
from shared.rpc.server import PrismServer

MIB = 1024 * 1024
GIB = 1024 * MIB


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m services.cache", description=__doc__)
    p.add_argument("--host", default=env("PRISM_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(env("PRISM_PORT", "50053") or 50053))
    p.add_argument(
        "--memory-mb",
        type=float,
        default=float(env("PRISM_CACHE_MEMORY_MB", "1024") or 1024),
        help="memory tier byte cap in MiB [PRISM_CACHE_MEMORY_MB]",
    )
    p.add_argument(
        "--vision-cache-size",
        type=float,
        default=float(env("PRISM_VISION_CACHE_SIZE", "0") or 0),
        help="memory-tier cap in MiB for vision features (namespace features); 0 = only the "
        "global cap [PRISM_VISION_CACHE_SIZE]",
    )
    p.add_argument(
        "--prefix-cache-memory-mb",
        type=float,
        default=float(env("PRISM_PREFIX_CACHE_MEMORY_MB", "0") or 0),
        help="memory-tier cap in MiB for prefix KV blocks (namespace kv); 0 = only the global "
        "cap [PRISM_PREFIX_CACHE_MEMORY_MB]",
    )
    # mlx-vlm's APC_* names are fallbacks, so one environment can configure either server.
    p.add_argument(
        "--disk-path",
        default=env("PRISM_CACHE_DISK_PATH") or env("APC_DISK_PATH", ""),
        help="disk tier directory; empty = no disk tier [PRISM_CACHE_DISK_PATH, APC_DISK_PATH]",
    )
    p.add_argument(
        "--disk-max-gb",
        type=float,
        default=float(env("PRISM_CACHE_DISK_MAX_GB") or env("APC_DISK_MAX_GB") or 10),
        help="disk tier byte cap in GiB [PRISM_CACHE_DISK_MAX_GB, APC_DISK_MAX_GB]",
    )
    p.add_argument("--grace", type=float, default=float(env("PRISM_GRACE", "30") or 30))
    p.add_argument("--log-level", default=env("PRISM_LOG_LEVEL", "INFO"))
    args = p.parse_args(argv)
    sizes = ("memory_mb", "vision_cache_size", "prefix_cache_memory_mb", "disk_max_gb")
    for name in sizes:
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must not be negative")
    return args


def build_store(args: argparse.Namespace) -> TieredStore:
    caps = {"features": args.vision_cache_size, "kv": args.prefix_cache_memory_mb}
    memory = MemoryStore(int(args.memory_mb * MIB), {ns: int(mb * MIB) for ns, mb in caps.items()})
    disk = DiskStore(args.disk_path, int(args.disk_max_gb * GIB)) if args.disk_path else None
    return TieredStore(memory, disk)


async def serve(args: argparse.Namespace) -> None:
    log = structlog.get_logger("cache")
    log.info(
        "cache_config",
        memory_mb=args.memory_mb,
        vision_cache_mb=args.vision_cache_size or None,
        prefix_cache_memory_mb=args.prefix_cache_memory_mb or None,
        disk_path=args.disk_path or None,
        disk_max_gb=args.disk_max_gb if args.disk_path else None,
    )
    store = build_store(args)
    server = PrismServer(add_cache_servicer(store), grace=args.grace)
    try:
        await server.start(f"{args.host}:{args.port}")
        await server.wait()
    finally:
        # Writes still queued would otherwise be lost with the process.
        await asyncio.to_thread(store.close)
        log.info("cache_closed", **dataclasses.asdict(store.stats()))


def main(argv: list[str] | None = None) -> int:
    return run_service("cache", serve, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
