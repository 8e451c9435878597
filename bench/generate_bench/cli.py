"""Flags and the main flow: prepare, run both tools on every case, print the tables."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from . import REPO
from .phases import PEER_PHASES, PRISM_PHASES, phase_table, phases
from .prepare import ensure_checkpoint, ensure_image, ensure_peer, image_grid
from .report import check_lengths, table
from .runs import IMAGE_PROMPT, TEXT_PROMPT, Run, peer_cmd, prism_cmd, run_tool


def _parse(argv: list[str] | None, description: str | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--peer-venv", type=Path, default=Path("/tmp/peer-venv"))
    p.add_argument("--workdir", type=Path, default=Path("/tmp/prism-bench"))
    p.add_argument("--model", type=Path, default=None, help="default: WORKDIR/qwen2_5_vl-small")
    p.add_argument("--image", type=Path, default=None, help="default: WORKDIR/image-448.png")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-text", action="store_true", help="skip the text-only row")
    p.add_argument("--phases", action="store_true", help="also time each phase in-process")
    p.add_argument("--phases-only", action="store_true", help="only the phase timings")
    p.add_argument(
        "--prism-no-torch",
        action="store_true",
        help="run prism with torch unimportable (a runtime install has no torch)",
    )
    p.add_argument("--json", type=Path, default=None, help="write every run here")
    return p.parse_args(argv)


def compare(
    args: argparse.Namespace,
    cases: dict[str, tuple[str, Path | None]],
    labels: dict[str, str],
    model: Path,
    peer_python: Path,
    peer_cwd: Path,
) -> None:
    """Both CLIs on every case, `args.repeats` times (after a warm-up); print the table."""
    runs: list[Run] = []
    for case, (prompt, img) in cases.items():
        commands = {
            "prism": (prism_cmd(model, prompt, img, args.max_tokens, args.prism_no_torch), REPO),
            "mlx-vlm": (peer_cmd(peer_python, model, prompt, img, args.max_tokens), peer_cwd),
        }
        for tool, (cmd, cwd) in commands.items():  # warm-up: page cache, .pyc files
            run_tool(tool, case, cmd, cwd)
        for rep in range(args.repeats):
            order = list(commands) if rep % 2 == 0 else list(commands)[::-1]
            for tool in order:
                run = run_tool(tool, case, *commands[tool])
                print(
                    f"{case} {tool}: prompt {run.prompt_tps:.1f} tok/s, "
                    f"gen {run.gen_tps:.1f} tok/s ({run.gen_tokens} tok), load {run.load:.1f}",
                    file=sys.stderr,
                )
                runs.append(run)

    print("\n".join(check_lengths(runs, args.max_tokens)), file=sys.stderr)
    print(table(runs, {c: labels[c] for c in cases}))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in runs], indent=2))


def main(argv: list[str] | None = None, description: str | None = None) -> int:
    """Run the comparison; `description` heads --help (the entry script passes its docstring)."""
    args = _parse(argv, description)
    peer_python = ensure_peer(args.peer_venv)
    model = ensure_checkpoint(args.model or args.workdir / "qwen2_5_vl-small")
    image = ensure_image(args.image or args.workdir / "image-448.png")
    t, h, w = image_grid(model, image)
    print(f"image grid {t}x{h}x{w} -> {t * h * w // 4} image tokens", file=sys.stderr)
    cases = {"image": (IMAGE_PROMPT, image)}
    if not args.no_text:
        cases["text"] = (TEXT_PROMPT, None)
    labels = {"image": f"image {h * 14}x{w * 14}", "text": "text only"}
    peer_cwd = Path(tempfile.mkdtemp(prefix="peer-cwd-"))  # keep the repo off the peer's path

    if not args.phases_only:
        compare(args, cases, labels, model, peer_python, peer_cwd)
    if args.phases or args.phases_only:
        common = [str(model), str(image), IMAGE_PROMPT, str(args.max_tokens), str(args.repeats)]
        ours = phases(REPO / ".venv" / "bin" / "python", PRISM_PHASES, common, REPO)
        theirs = phases(peer_python, PEER_PHASES, common, peer_cwd)
        print(f"\nPhases, image case ({args.repeats} runs each, median (runs)):\n")
        print(phase_table(ours, theirs))
    return 0
