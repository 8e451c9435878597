"""Flags and the main flow: start both servers, warm up, run every level, print the report."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from . import REPO, phases
from .context import default_concurrency, header, make_small
from .load import KINDS, bodies_for, noise_png, run_level
from .report import Row, ratio_table, summarize, table
from .servers import Server, ensure_up, peer_server, prism_server


def _parse(argv: list[str] | None, description: str | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawTextHelpFormatter
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", type=Path, help="an existing mlx-layout checkpoint folder")
    src.add_argument(
        "--make-small",
        action="store_true",
        help="write (once) and use WORKDIR/qwen2_5_vl-small-mlx-bf16 (the default)",
    )
    p.add_argument(
        "--concurrency",
        default=None,
        help="comma-separated levels; default 1,8 when MLX runs on the CPU, else 1,8,32",
    )
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--requests-per-level", type=int, default=0, help="0: max(4, 2 x concurrency)")
    p.add_argument("--prompts", default="text,image", help="comma-separated: text, image")
    p.add_argument("--image-size", type=int, default=448, help="square side in pixels")
    p.add_argument("--warmup", type=int, default=1, help="uncounted requests per server and kind")
    p.add_argument(
        "--level-warmup",
        action="store_true",
        help="before each level, C uncounted requests at concurrency C (compiles batch shapes)",
    )
    p.add_argument("--skip-peer", action="store_true", help="measure Prism only")
    p.add_argument("--skip-prism", action="store_true", help="measure mlx-vlm only")
    p.add_argument("--prism-python", type=Path, default=REPO / ".venv" / "bin" / "python")
    p.add_argument(
        "--prism-src",
        type=Path,
        default=REPO,
        help="run Prism's code from this folder (e.g. an exported commit; default: this repo)",
    )
    p.add_argument("--peer-python", type=Path, default=Path("/tmp/peer-venv/bin/python"))
    p.add_argument(
        "--prism-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra launcher flag (repeat; --prism-arg=--decoder-arg=--max-waiting=256)",
    )
    p.add_argument(
        "--peer-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra mlx_vlm.server flag (repeat; e.g. --peer-arg=--max-num-seqs=32)",
    )
    for side in ("prism", "peer"):
        p.add_argument(
            f"--{side}-env",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help=f"environment variable for the {side} server only (repeat), e.g. "
            + ("PRISM_MAX_NUM_SEQS=64" if side == "prism" else "PYTHONPATH=/opt/mlx-vlm"),
        )
    p.add_argument("--device-note", default="", help="printed in the header (hardware, backend)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/prism-bench"))
    p.add_argument("--log-dir", type=Path, default=None, help="default: WORKDIR/serve-<time>")
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--startup-timeout", type=float, default=900.0)
    p.add_argument("--json", type=Path, default=None, help="write every row and request here")
    return p.parse_args(argv)


def _prepare(args: argparse.Namespace) -> tuple[Path, list[int], list[str], list[Server]]:
    """The checkpoint, concurrency levels, prompt kinds and (not yet started) servers."""
    args.workdir.mkdir(parents=True, exist_ok=True)
    args.prism_src = args.prism_src.resolve()
    model = (args.model or make_small(args)).resolve()
    if not (model / "config.json").exists():
        sys.exit(f"{model}: no config.json")
    levels = [
        int(c) for c in (args.concurrency or default_concurrency(args.prism_python)).split(",")
    ]
    kinds = [k for k in args.prompts.split(",") if k]
    if set(kinds) - set(KINDS):
        sys.exit(f"--prompts: unknown kind in {kinds}; choose from {KINDS}")
    if not args.skip_peer and not args.peer_python.exists():
        sys.exit(
            f"{args.peer_python} missing: python3 -m venv /tmp/peer-venv && /tmp/peer-venv/bin/pip "
            "install mlx-vlm==0.7.10 'mlx[cpu]==0.32.4' (or pass --skip-peer)"
        )
    log_dir = args.log_dir or args.workdir / time.strftime("serve-%Y%m%d-%H%M%S")
    servers: list[Server] = []
    if not args.skip_prism:
        servers.append(prism_server(args, model, log_dir / "prism"))
    if not args.skip_peer:
        servers.append(peer_server(args, model, log_dir))
    print(f"logs: {log_dir}", file=sys.stderr, flush=True)
    return model, levels, kinds, servers


def _start(servers: list[Server]) -> None:
    for s in servers:
        tic = time.perf_counter()
        note = ensure_up(s)
        print(
            f"{s.name}: {note or 'ready'} in {time.perf_counter() - tic:.0f} s "
            f"(model id {s.model_id!r})",
            file=sys.stderr,
            flush=True,
        )


def _warm_up(args: argparse.Namespace, servers: list[Server], kind: str) -> None:
    """`--warmup` uncounted requests per server for this kind, one at a time."""
    warm_tags = [f"warmup-{kind}-{i}" for i in range(args.warmup)]
    warm_images = {t: noise_png(10_000 + i, args.image_size) for i, t in enumerate(warm_tags)}
    for s in servers if warm_tags else ():
        if ensure_up(s) == "did not start":
            continue
        body = bodies_for(s, kind, warm_tags, warm_images if kind == "image" else {}, 8)
        warm = asyncio.run(run_level(s, body, 1, args.request_timeout))
        bad = [r.error for r in warm if not r.ok]
        print(f"{s.name} {kind} warm-up: {bad or 'ok'}", file=sys.stderr, flush=True)


def _level(args: argparse.Namespace, order: list[Server], kind: str, c: int) -> list[Row]:
    """One concurrency level of one kind, on each server in `order`: a row per server."""
    n = args.requests_per_level or max(4, 2 * c)
    tags = [f"c{c}-r{i}" for i in range(n)]
    images = (
        {t: noise_png(1000 * c + i, args.image_size) for i, t in enumerate(tags)}
        if kind == "image"
        else {}
    )
    warm_level = [f"w{c}-r{i}" for i in range(c if args.level_warmup else 0)]
    warm_images = (
        {t: noise_png(500_000 + 1000 * c + i, args.image_size) for i, t in enumerate(warm_level)}
        if kind == "image"
        else {}
    )
    rows: list[Row] = []
    for s in order:
        note = ensure_up(s)
        if note == "did not start":
            rows.append(summarize(s.name, kind, c, n, [], note))
            continue
        if warm_level:  # C uncounted requests at once: batch shapes, kernels
            body = bodies_for(s, kind, warm_level, warm_images, args.max_tokens)
            asyncio.run(run_level(s, body, c, args.request_timeout))
        body = bodies_for(s, kind, tags, images, args.max_tokens)
        before = phases.scrape(s.url) if s.name == "prism" else {}
        results = asyncio.run(run_level(s, body, c, args.request_timeout))
        if not s.alive():
            note = (note + "; " if note else "") + "crashed during the level"
        row = summarize(s.name, kind, c, n, results, note)
        if before:
            row.phases = phases.means(before, phases.scrape(s.url))
        rows.append(row)
        print(
            f"{s.name} {kind} c={c}: {row.ok}/{n} ok, {row.tok_s:.1f} tok/s, "
            f"TTFT p50 {row.ttft_p50:.2f} s, ITL p50 {1e3 * row.itl_p50:.0f} ms"
            + (f", errors {row.errors}" if row.errors else "")
            + (f" ({note})" if note else ""),
            file=sys.stderr,
            flush=True,
        )
    return rows


def _report(
    args: argparse.Namespace, head: str, rows: list[Row], kinds: list[str], servers: list[Server]
) -> None:
    """The header, the tables and the notes on stdout; everything as JSON with --json."""
    rows.sort(key=lambda r: (kinds.index(r.kind), r.concurrency, r.server != "prism"))
    print(f"```\n{head}\n```\n")
    print(table(rows))
    if len(servers) == 2:
        print("\nPrism / mlx-vlm:\n")
        print(ratio_table(rows))
    if any(r.phases for r in rows):
        print("\nPrism's time to first token by phase (means per request, gateway metrics):\n")
        print(phases.table(rows))
    notes = [
        f"- {r.server} {r.kind} c={r.concurrency}: {r.note + '; ' if r.note else ''}"
        f"errors: {'; '.join(r.errors) or 'none'}"
        for r in rows
        if r.errors or r.note
    ]
    if notes:
        print("\n" + "\n".join(notes))
    if args.json:
        args.json.write_text(json.dumps({"header": head, "rows": [asdict(r) for r in rows]}))


def main(argv: list[str] | None = None, description: str | None = None) -> int:
    """Run the benchmark; `description` heads --help (the entry script passes its docstring)."""
    args = _parse(argv, description)
    model, levels, kinds, servers = _prepare(args)
    rows: list[Row] = []
    try:
        _start(servers)
        head = header(args, model, levels, servers)
        print(head, file=sys.stderr, flush=True)
        turn = 0
        for kind in kinds:
            _warm_up(args, servers, kind)
            for c in levels:
                order = servers if turn % 2 == 0 else servers[::-1]
                turn += 1
                rows += _level(args, order, kind, c)
    finally:
        for s in servers:
            s.stop()
    _report(args, head, rows, kinds, servers)
    return 0
