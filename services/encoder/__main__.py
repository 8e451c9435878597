"""python -m services.encoder --model M [--model M2 ...] --port 50051 --cache ADDR"""

from __future__ import annotations

import argparse
import sys

import structlog

from services.cache.client import CacheClient
from services.common.flags import add_server_flags, env_list, run_service
from services.common.models import served_ids
from services.encoder.engine import EncoderEngine
from services.encoder.servicer import add_to_server
from shared import cpu_blas
from shared.rpc.server import PrismServer
from shared.runtime import mlx_thread
from shared.runtime.loaded import LoadedModel, load_model

log = structlog.get_logger("encoder")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m services.encoder", description=__doc__)
    p.add_argument(
        "--model",
        action="append",
        default=None,
        help="checkpoint folder or Hub id; repeat for several [PRISM_MODELS, comma-separated]",
    )
    p.add_argument("--served-model-name", action="append", default=[], help="one per --model")
    add_server_flags(p, default_port=50051)
    args = p.parse_args(argv)
    args.model = args.model or env_list("PRISM_MODELS")
    if not args.model:
        p.error("--model (or PRISM_MODELS) is required")
    return args


def load_vision_models(args: argparse.Namespace) -> dict[str, LoadedModel]:
    """Load each model's vision half; a text-only model has nothing to encode: refuse it."""
    models = {}
    for model_id, path in served_ids(args.model, args.served_model_name):
        loaded = load_model(path, components=["vision"], dtype=args.dtype)
        if loaded.vision is None:
            raise ValueError(
                f"{path} ({loaded.family.name}) is a text-only model; it needs no encoder "
                "(serve it with the decoder alone)"
            )
        models[model_id] = loaded
    return models


async def serve(args: argparse.Namespace) -> None:
    # Loaded on the MLX thread: arrays built there are only evaluated there (thread-local streams).
    models = await mlx_thread.run(load_vision_models, args)
    cache = CacheClient(args.cache)
    engine = EncoderEngine(models, cache)
    server = PrismServer(add_to_server(engine), grace=args.grace)
    await server.start(f"{args.host}:{args.port}")
    log.info("encoder_ready", models=list(models), cache=args.cache, cpu_blas=cpu_blas.status())
    try:
        await server.wait()
    finally:
        await cache.close()


def main(argv: list[str] | None = None) -> int:
    return run_service("encoder", serve, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
