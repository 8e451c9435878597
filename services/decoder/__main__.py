"""python -m services.decoder --model M [--served-model-name NAME] --port 50052 --cache ADDR"""

from __future__ import annotations

import argparse
import asyncio
import sys

import structlog

from services.cache.client import CacheClient
from services.common.flags import add_server_flags, env, run_service
from services.common.models import served_ids
from services.decoder import warmup
from services.decoder.apc.remote import RemoteTier
from services.decoder.config import (
    add_engine_flags,
    add_prefix_flags,
    add_spec_flags,
    config_from_args,
    spec_flags_error,
)
from services.decoder.engine import DecoderEngine
from services.decoder.reasoning import add_flags as add_reasoning_flags
from services.decoder.reasoning import defaults_from_args
from services.decoder.servicer import add_to_server
from shared import cpu_blas
from shared.models.kv_quant.config import from_args as kv_quant_from_args
from shared.rpc.server import PrismServer
from shared.runtime import mlx_thread
from shared.runtime.loaded import load_model

log = structlog.get_logger("decoder")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m services.decoder", description=__doc__)
    p.add_argument("--model", default=env("PRISM_MODEL"), help="folder or Hub id [PRISM_MODEL]")
    p.add_argument(
        "--served-model-name",
        default=env("PRISM_SERVED_MODEL_NAME"),
        help="the id clients use (default: --model as given) [PRISM_SERVED_MODEL_NAME]",
    )
    p.add_argument(
        "--max-model-len",
        type=int,
        default=int(env("PRISM_MAX_MODEL_LEN", "0") or 0),
        help="prompt + completion limit (0: the model's max_position_embeddings)",
    )
    p.add_argument(
        "--max-waiting",
        type=int,
        default=int(env("PRISM_MAX_WAITING", "64") or 64),
        help="requests queued beyond this are refused with RESOURCE_EXHAUSTED",
    )
    p.add_argument(
        "--warmup",
        choices=["auto", "on", "off"],
        default=env("PRISM_WARMUP", "auto"),
        help="serve dummy batches of every size before reporting ready (auto: on a GPU, where"
        " MLX builds kernels per shape at run time) [PRISM_WARMUP]",
    )
    add_engine_flags(p)
    add_prefix_flags(p)
    add_spec_flags(p)
    add_reasoning_flags(p)
    add_server_flags(p, default_port=50052)
    args = p.parse_args(argv)
    if not args.model:
        p.error("--model (or PRISM_MODEL) is required")
    if args.apc_block_size < 1 or args.apc_num_blocks < 0:
        p.error("--apc-block-size must be >= 1 and --apc-num-blocks >= 0")
    if error := spec_flags_error(args):
        p.error(error)
    try:  # bad KV quantization flags are refused before the model loads
        kv_quant_from_args(args)
    except ValueError as exc:
        p.error(str(exc))
    return args


async def serve(args: argparse.Namespace) -> None:
    [(model_id, path)] = served_ids([args.model], [args.served_model_name or ""])
    # Loaded on the MLX thread, which the engine then keeps (thread-local MLX streams).
    model = await mlx_thread.run(load_model, path, components=["language"], dtype=args.dtype)
    # Bad reasoning flags are refused before anything starts.
    defaults = defaults_from_args(args, model.tokenizer)
    engine = DecoderEngine(model, model_id, config_from_args(args))
    engine.start()
    if warmup.wanted(args.warmup):  # before the server is up: health says ready afterwards
        await warmup.warm_up(engine)
    cache = CacheClient(args.cache)
    remote = RemoteTier(engine.prefix, cache) if engine.prefix.enabled and args.apc_remote else None
    server = PrismServer(add_to_server(engine, cache, defaults, remote), grace=args.grace)
    try:
        await server.start(f"{args.host}:{args.port}")
        cfg = engine.config
        log.info(
            "decoder_ready", model=model_id, max_model_len=cfg.max_model_len,
            max_num_seqs=cfg.max_num_seqs, max_num_batched_tokens=cfg.max_num_batched_tokens,
            kv_cache_tokens=cfg.kv_tokens, kv_cache=cfg.kv_quant.describe(),
            kv_bytes_per_token=cfg.kv_bytes_per_token, cpu_blas=cpu_blas.status(),
        )  # fmt: skip
        await server.wait()
    finally:
        await asyncio.to_thread(engine.shutdown)
        if remote is not None:  # the last prompts' blocks still reach the cache service
            try:
                await asyncio.wait_for(remote.drain(), args.grace)
            except asyncio.TimeoutError:
                log.warning("apc_writes_dropped_at_shutdown")
            await remote.close()
        await cache.close()


def main(argv: list[str] | None = None) -> int:
    return run_service("decoder", serve, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
