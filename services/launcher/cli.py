"""`python -m services.launcher` (what `make run-local` runs): the whole stack on one machine.

Without --model it serves the built-in demo checkpoint (random weights: noise out). Exit
status: 0 after Ctrl-C or SIGTERM (everything stopped), 1 when a component fails to start or
dies (everything else is stopped first), 2 for a bad model or flags.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from services.launcher.probes import StackError
from services.launcher.stack import Stack, StackConfig

DEMO_BANNER = """\
************************************************************************************
*  DEMO MODE: serving Prism's built-in checkpoint "{name}" with RANDOM WEIGHTS.
*  Its answers are noise; it only shows the stack working end to end.
*  Serve a real model with: make run-local MODEL=Qwen/Qwen2.5-VL-3B-Instruct
************************************************************************************"""


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name) or default)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m services.launcher", description=__doc__)
    p.add_argument(
        "--model",
        default=os.environ.get("PRISM_MODEL") or None,
        help="local folder or Hub id [PRISM_MODEL]; default: the random demo",
    )
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--host", default="127.0.0.1", help="where every component binds")
    p.add_argument("--gateway-port", type=int, default=_env_int("PRISM_GATEWAY_PORT", 8080))
    for name in ("cache", "encoder", "decoder"):
        p.add_argument(
            f"--{name}-port",
            type=int,
            default=0,
            help="0: a free port; replica i of N gets port + i",
        )
    p.add_argument("--encoders", type=int, default=1, help="number of encoder processes")
    p.add_argument("--decoders", type=int, default=1, help="number of decoder processes")
    p.add_argument("--cache-disk-path", default=os.environ.get("PRISM_CACHE_DISK_PATH") or None)
    p.add_argument("--cache-memory-mb", type=int, default=None)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument(
        "--api-key",
        default=os.environ.get("PRISM_API_KEY") or None,
        help="require this key at the gateway [PRISM_API_KEY]",
    )
    p.add_argument("--allowed-local-media-path", default=None)
    for name in ("cache", "encoder", "decoder", "gateway"):
        p.add_argument(
            f"--{name}-arg",
            action="append",
            default=[],
            metavar="ARG",
            help=f"extra flag for the {name} (repeat; use --{name}-arg=--flag)",
        )
    p.add_argument("--grace", type=float, default=5.0, help="drain time on stop (seconds)")
    p.add_argument("--log-level", default="INFO")
    p.add_argument(
        "--log-dir",
        type=Path,
        default=None,
        help="write each component's log to DIR/<name>.log instead of the terminal",
    )
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument(
        "--prepare-only",
        action="store_true",
        help="resolve (download or generate) the model, print its folder, exit",
    )
    p.add_argument(
        "--demo-dir",
        type=Path,
        default=None,
        help="where the demo checkpoint lives (default: $PRISM_HOME/demo/...)",
    )
    return p


def resolve(args: argparse.Namespace) -> tuple[str, Path, bool, bool]:
    """(model string for the services, local folder, has vision, random weights)."""
    from shared.loading.config import load_config
    from shared.loading.hub import resolve_model_path
    from shared.models.registry import family_for
    from shared.testing.demo import demo_checkpoint, is_demo_checkpoint

    if args.model is None:
        path = demo_checkpoint(args.demo_dir)
        model = str(path)
    else:
        model = args.model
        path = resolve_model_path(model)  # download once here, not once per replica
    config = load_config(path)
    return model, path, family_for(config).vision is not None, is_demo_checkpoint(path)


def config_from_args(args: argparse.Namespace, model: str, vision: bool, demo: bool) -> StackConfig:
    from shared.testing.demo import DEMO_MODEL_NAME

    gateway_args = list(args.gateway_arg)
    if args.allowed_local_media_path:
        gateway_args += ["--allowed-local-media-path", args.allowed_local_media_path]
    return StackConfig(
        model=model,
        with_encoder=vision,
        served_model_name=args.served_model_name or (DEMO_MODEL_NAME if demo else None),
        api_key=args.api_key,
        host=args.host,
        gateway_port=args.gateway_port,
        cache_port=args.cache_port,
        encoder_port=args.encoder_port,
        decoder_port=args.decoder_port,
        num_encoders=args.encoders,
        num_decoders=args.decoders,
        cache_disk_path=args.cache_disk_path,
        cache_memory_mb=args.cache_memory_mb,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        grace=args.grace,
        log_level=args.log_level,
        log_dir=args.log_dir,
        cache_args=args.cache_arg,
        encoder_args=args.encoder_arg,
        decoder_args=args.decoder_arg,
        gateway_args=gateway_args,
        startup_timeout=args.startup_timeout,
    )


def print_summary(stack: Stack, model_id: str) -> None:
    lines = [
        f"Prism is serving {model_id!r} at {stack.base_url} (OpenAI API; also /health, "
        "/ready, /metrics)"
    ]
    for child in stack.all_children():
        component = child.name.rsplit("-", 1)[0]
        where = (
            stack.gateway_url
            if component == "gateway"
            else stack.address(component, int(child.name.rsplit("-", 1)[1]))
        )  # type: ignore[arg-type]
        lines.append(f"  {child.name:<10} {where:<28} pid {child.pid}")
    lines.append("Press Ctrl-C to stop.")
    print("\n".join(lines), flush=True)


def supervise(stack: Stack, poll_s: float = 0.5) -> int:
    """Block until Ctrl-C/SIGTERM (-> 0) or a component dies (-> 1); stop everything."""
    try:
        while True:
            dead = stack.dead()
            if dead:
                for child in dead:
                    print(
                        f"prism: {child.name} exited with status {child.returncode()}; "
                        f"stopping the stack.\n{child.tail()}",
                        file=sys.stderr,
                        flush=True,
                    )
                shutdown(stack)
                return 1
            time.sleep(poll_s)
    except KeyboardInterrupt:
        print("prism: stopping...", file=sys.stderr, flush=True)
        shutdown(stack)
        return 0


def shutdown(stack: Stack) -> None:
    """Graceful stop; a second Ctrl-C kills what is left at once."""
    try:
        stack.stop()
    except KeyboardInterrupt:
        for child in stack.all_children():
            child.signal(signal.SIGKILL)
            child.wait(5.0)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # SIGTERM (docker stop, systemd, kill) is handled exactly like Ctrl-C.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        model, path, vision, demo = resolve(args)
    except KeyboardInterrupt:
        return 0
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback, for a bad --model
        print(f"prism: {exc}", file=sys.stderr)
        return 2
    if args.prepare_only:
        print(path)
        return 0
    config = config_from_args(args, model, vision, demo)
    if demo:
        print(
            DEMO_BANNER.format(name=config.served_model_name or model), file=sys.stderr, flush=True
        )
    stack = Stack(config)
    try:
        stack.start()
    except KeyboardInterrupt:
        return 0  # start() already stopped what it had started
    except StackError as exc:
        print(f"prism: {exc}", file=sys.stderr, flush=True)
        return 1
    print_summary(stack, config.served_model_name or model)
    if demo:
        print("(demo: random weights, output is noise)", flush=True)
    return supervise(stack)
