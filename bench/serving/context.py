"""What a run measured on: machine, checkpoint, versions and Prism's source (the header)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

from . import REPO
from .servers import Server


def run_out(argv: list[str], cwd: Path = REPO) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"? ({exc})"
    return proc.stdout.strip() if proc.returncode == 0 else f"? ({proc.stderr.strip()[-200:]})"


def versions(python: Path, packages: tuple[str, ...], cwd: Path) -> str:
    code = (
        "import importlib.metadata as m, mlx.core as mx\n"
        f"print(', '.join(p + ' ' + m.version(p) for p in {packages!r}), mx.default_device())"
    )
    return run_out([str(python), "-c", code], cwd=cwd)


def prism_source(src: Path) -> str:
    """Where Prism's code came from and which decoder engine it has."""
    batched = (src / "services" / "decoder" / "scheduler.py").exists()
    engine = (
        "continuous batching (services/decoder/scheduler.py present)"
        if batched
        else "one request decodes at a time (no services/decoder/scheduler.py)"
    )
    if not (src / ".git").exists():
        return f"source {src} (not a git checkout); decoder: {engine}"
    head = run_out(["git", "log", "-1", "--format=%h %s"], cwd=src)
    decoder = run_out(["git", "log", "-1", "--format=%h", "--", "services/decoder"], cwd=src)
    dirty = run_out(["git", "status", "--porcelain", "--untracked-files=all"], cwd=src)
    dirty_decoder = [line for line in dirty.splitlines() if "services/decoder/" in line]
    tree = f"{len(dirty.splitlines())} uncommitted files" if dirty else "clean tree"
    if dirty_decoder:
        tree += f", {len(dirty_decoder)} of them in services/decoder"
    return (
        f"source {src} at {head} ({tree}); decoder: {engine}, services/decoder last "
        f"committed in {decoder}"
    )


def make_small(args: argparse.Namespace) -> Path:
    out = args.workdir / "qwen2_5_vl-small-mlx-bf16"
    if not (out / "config.json").exists():
        print(f"writing the small checkpoint to {out}", file=sys.stderr, flush=True)
        cmd = [str(args.prism_python), str(REPO / "bench" / "make_checkpoint.py"), "--size"]
        cmd += ["small", "--layout", "mlx", "--dtype", "bfloat16", "--out", str(out)]
        subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return out


def default_concurrency(prism_python: Path) -> str:
    device = run_out([str(prism_python), "-c", "import mlx.core as mx; print(mx.default_device())"])
    return "1,8" if "cpu" in device.lower() else "1,8,32"


def weight_dtypes(model: Path) -> str:
    """The dtypes stored in the checkpoint's first safetensors file (its JSON header)."""
    files = sorted(model.glob("*.safetensors"))
    if not files:
        return "?"
    with open(files[0], "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        meta = json.loads(f.read(size))
    counts: dict[str, int] = {}
    for name, info in meta.items():
        if name != "__metadata__":
            counts[info["dtype"]] = counts.get(info["dtype"], 0) + 1
    return ", ".join(f"{d} x{n}" for d, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def header(args: argparse.Namespace, model: Path, levels: list[int], servers: list[Server]) -> str:
    config = json.loads((model / "config.json").read_text())
    text_cfg = config.get("text_config", config)
    vision = config.get("vision_config", {})
    lines = [
        f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        f"device: {args.device_note or '(no --device-note)'}; host {platform.machine()}, "
        f"{os.cpu_count()} CPUs, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        f"model: {model} ({config.get('model_type')}, hidden {text_cfg.get('hidden_size')}, "
        f"{text_cfg.get('num_hidden_layers')} layers; vision depth {vision.get('depth')}, "
        f"hidden {vision.get('hidden_size')}; tensors {weight_dtypes(model)}, "
        f"quantization {config.get('quantization', 'none')})",
        f"load: max_tokens {args.max_tokens}, greedy, streaming; concurrency "
        f"{','.join(map(str, levels))}; requests per level "
        f"{args.requests_per_level or 'max(4, 2C)'}; prompts {args.prompts} "
        f"(image: one {args.image_size}x{args.image_size} PNG per request); warm-up "
        f"{args.warmup} per server and kind"
        + ("; C uncounted requests before each level" if args.level_warmup else ""),
    ]
    for s in servers:
        if s.name == "prism":
            lines.append(
                f"prism: {versions(args.prism_python, ('mlx',), REPO)}; "
                f"{prism_source(args.prism_src)}"
            )
        else:
            peer = versions(args.peer_python, ("mlx-vlm", "mlx"), s.cwd)
            lines.append(f"mlx-vlm: {peer} ({args.peer_python})")
        lines.append(f"  {s.name} argv: {shlex.join(s.argv)}")
    lines.append(f"command: {shlex.join([Path(sys.executable).name, *sys.argv])}")
    return "\n".join(lines)
