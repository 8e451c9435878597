"""`prism generate` vs `mlx_vlm.generate` (mlx-vlm 0.7.10), side by side on one checkpoint.

    .venv/bin/python bench/generate_vs_mlx_vlm.py              # table of both tools' own stats
    .venv/bin/python bench/generate_vs_mlx_vlm.py --phases     # + time per phase, both tools

The peer lives in its own virtualenv outside the repo (created on first use when missing):

    python3 -m venv /tmp/peer-venv
    /tmp/peer-venv/bin/pip install mlx-vlm==0.7.10 'mlx[cpu]==0.32.4'

Both tools run as subprocesses, greedy, `--max-tokens 128 --verbose`, on the same random-weight
checkpoint (Qwen2.5-VL "small" preset of `shared/testing/fixtures.py`, bf16, mlx-community
layout as written by our converter, which is the layout `mlx_vlm.load` reads), with the same
448x448 image (not resized: 32x32 patches, 256 image tokens) and prompt, plus a text-only prompt.
Runs alternate which tool goes first; every value is the median of `--repeats` runs (listed);
ratios are of medians and of each tool's best run (on a shared machine the least disturbed).

What each tool's numbers measure (read from both sources):
- prompt tok/s: prompt tokens / (vision tower + prefill + first token); image decoding,
  resizing and tokenization happen before the clock starts in both;
- generation tok/s: from the first token to the last; prism divides n - 1 decode steps by that
  time, mlx-vlm divides n tokens (about 1/n higher for the same speed; 0.8% at 128);
- peak memory: `mx.get_peak_memory()`; prism resets it when generation starts, mlx-vlm never
  does (its figure can include loading).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRISM = REPO / ".venv" / "bin" / "prism"
PEER_PACKAGES = ("mlx-vlm==0.7.10", "mlx[cpu]==0.32.4")
IMAGE_PROMPT = "Describe this image."
# Long enough for a measurable prefill; with seed 0 greedy decoding runs the full 128 tokens.
TEXT_PROMPT = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a lantern, "
    "a notebook and a small tin of oil. From the top he could see the harbour, the fishing boats "
    "returning with their nets, the gulls circling above the breakwater and the long grey line of "
    "the coast fading into the mist. "
) * 2 + "What happens next? Continue the story."

STATS = {
    "prompt_tokens": r"^Prompt: (\d+) tokens, [\d.]+ tokens-per-sec",
    "prompt_tps": r"^Prompt: \d+ tokens, ([\d.]+) tokens-per-sec",
    "gen_tokens": r"^Generation: (\d+) tokens, [\d.]+ tokens-per-sec",
    "gen_tps": r"^Generation: \d+ tokens, ([\d.]+) tokens-per-sec",
    "peak_gb": r"^Peak memory: ([\d.]+) GB",
}


@dataclass
class Run:
    tool: str
    case: str
    prompt_tokens: int
    prompt_tps: float
    gen_tokens: int
    gen_tps: float
    peak_gb: float
    wall_s: float
    load: float  # the machine's 1-minute load average when the run ended (2 cores: > 2 is busy)
    output: str


# ----------------------------------------------------------------------------- setup


def ensure_peer(venv: Path) -> Path:
    """The peer's python, creating the virtualenv when missing (never inside the repo)."""
    venv = venv.resolve()
    if venv == REPO or REPO in venv.parents:
        sys.exit(f"peer venv {venv} must be outside the repo {REPO}")
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"creating {venv} with {' '.join(PEER_PACKAGES)}", file=sys.stderr)
        subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", *PEER_PACKAGES], check=True)
    code = "import importlib.metadata as m; print(m.version('mlx-vlm'), m.version('mlx'))"
    versions = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    print(f"peer: mlx-vlm {versions.stdout.strip()} ({python})", file=sys.stderr)
    return python


def ensure_checkpoint(path: Path) -> Path:
    if not (path / "config.json").exists():
        from shared.testing.fixtures import make_checkpoint

        print(f"writing the checkpoint to {path}", file=sys.stderr)
        make_checkpoint("qwen2_5_vl", path, "mlx", dtype="bfloat16", size="small")
    return path


def ensure_image(path: Path) -> Path:
    if not path.exists():
        import numpy as np
        from PIL import Image

        pixels = np.random.default_rng(0).integers(0, 256, (448, 448, 3), np.uint8)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)
    return path


def image_grid(checkpoint: Path, image: Path) -> tuple[int, int, int]:
    """(t, h, w) patches of the image after the checkpoint's preprocessing (resize check)."""
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    proc = Qwen2VLImageProcessorPil.from_pretrained(str(checkpoint))
    grid = proc(images=Image.open(image).convert("RGB"))["image_grid_thw"][0]
    return tuple(int(x) for x in grid)


# ----------------------------------------------------------------------------- one run


# `prism` with torch made unimportable, as in a runtime install without the test extras
# (transformers imports torch whenever it is installed).
PRISM_NO_TORCH = (
    "import sys; sys.modules['torch'] = None; from shared.cli import main; sys.exit(main())"
)


def prism_cmd(
    model: Path, prompt: str, image: Path | None, max_tokens: int, no_torch: bool = False
) -> list[str]:
    exe = [str(REPO / ".venv" / "bin" / "python"), "-c", PRISM_NO_TORCH] if no_torch else [PRISM]
    cmd = [*map(str, exe), "generate", "--model", str(model), "--prompt", prompt]
    cmd += ["--image", str(image)] if image else []
    return cmd + ["--max-tokens", str(max_tokens), "--temperature", "0", "--verbose"]


def peer_cmd(
    python: Path, model: Path, prompt: str, image: Path | None, max_tokens: int
) -> list[str]:
    cmd = [str(python), "-m", "mlx_vlm.generate", "--model", str(model), "--prompt", prompt]
    cmd += ["--image", str(image)] if image else []
    cmd += ["--max-tokens", str(max_tokens), "--temperature", "0", "--verbose"]
    return cmd + ["--skip-special-tokens"]  # prism's output policy, so the texts compare


def run_tool(tool: str, case: str, cmd: list[str], cwd: Path) -> Run:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    tic = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env)
    wall = time.perf_counter() - tic
    if proc.returncode != 0:
        sys.exit(f"{tool} failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    both = proc.stdout + "\n" + proc.stderr
    stats = {}
    for key, pattern in STATS.items():
        match = re.search(pattern, both, re.MULTILINE)
        if match is None:
            sys.exit(f"{tool}: no {key!r} in its output:\n{both[-2000:]}")
        stats[key] = float(match.group(1))
    return Run(
        tool=tool,
        case=case,
        prompt_tokens=int(stats["prompt_tokens"]),
        prompt_tps=stats["prompt_tps"],
        gen_tokens=int(stats["gen_tokens"]),
        gen_tps=stats["gen_tps"],
        peak_gb=stats["peak_gb"],
        wall_s=wall,
        load=os.getloadavg()[0],
        output=proc.stdout,
    )


# ----------------------------------------------------------------------------- report


def _fmt(values: list[float], digits: int) -> str:
    med = statistics.median(values)
    runs = ", ".join(f"{v:.{digits}f}" for v in values)
    return f"{med:.{digits}f} ({runs})"


def _ratio(a: list[float], b: list[float], higher_is_better: bool) -> str:
    """Ratio of medians, then of each tool's best run (least disturbed by other processes)."""
    best = max if higher_is_better else min
    return f"{statistics.median(a) / statistics.median(b):.2f} (best {best(a) / best(b):.2f})"


def _prism_text(stdout: str) -> str:
    return stdout[:-1] if stdout.endswith("\n") else stdout  # `prism` adds one newline


def _peer_text(stdout: str) -> str:
    """mlx-vlm --verbose prints the templated prompt (ending "<|im_start|>assistant\n") and a
    newline, the text, then "\n==========" and its stats."""
    start = stdout.rindex("<|im_start|>assistant\n") + len("<|im_start|>assistant\n\n")
    return stdout[start : stdout.rindex("\n==========")]


def _ints(runs: list[Run], field: str) -> str:
    return ", ".join(sorted({str(getattr(r, field)) for r in runs}))


METRICS = (  # (label, Run field, digits, higher is better)
    ("prompt tok/s", "prompt_tps", 1, True),
    ("generation tok/s", "gen_tps", 1, True),
    ("peak memory (GB)", "peak_gb", 3, False),
    ("process wall time (s)", "wall_s", 2, False),
)
LOAD_ROW = "1-min load average after each run"


def table(runs: list[Run], cases: dict[str, str]) -> str:
    lines = [
        "| case | metric | prism | mlx-vlm | prism / mlx-vlm |",
        "|---|---|---|---|---|",
    ]
    for case, label in cases.items():
        prism = [r for r in runs if r.case == case and r.tool == "prism"]
        peer = [r for r in runs if r.case == case and r.tool == "mlx-vlm"]
        same = all(
            _prism_text(p.output) == _peer_text(q.output) for p, q in zip(prism, peer, strict=True)
        )
        lines.append(f"| {label} | prompt tokens | {_ints(prism, 'prompt_tokens')} | ")
        lines[-1] += f"{_ints(peer, 'prompt_tokens')} | |"
        lines.append(f"| | generated tokens | {_ints(prism, 'gen_tokens')} | ")
        lines[-1] += f"{_ints(peer, 'gen_tokens')} | |"
        for name, field, digits, higher in METRICS:
            a = [getattr(r, field) for r in prism]
            b = [getattr(r, field) for r in peer]
            ratio = _ratio(a, b, higher)
            lines.append(f"| | {name} | {_fmt(a, digits)} | {_fmt(b, digits)} | {ratio} |")
        loads = [_fmt([r.load for r in rows], 1) for rows in (prism, peer)]
        lines.append(f"| | {LOAD_ROW} | {loads[0]} | {loads[1]} | |")
        lines.append(f"| | identical generated text, every run | {'yes' if same else 'NO'} | | |")
    return "\n".join(lines)


def check_lengths(runs: list[Run], max_tokens: int) -> list[str]:
    """Notes for runs that stopped before max_tokens (an EOS from the random model)."""
    return [
        f"note: {r.tool} {r.case} generated {r.gen_tokens} < {max_tokens} tokens (EOS)"
        for r in runs
        if r.gen_tokens < max_tokens
    ]


# ----------------------------------------------------------------------------- phases

# Each prints one JSON line per repeat: times in ms. "prefill" is prompt time minus the vision
# tower evaluated on its own, so it includes merging the features and the first token.
PRISM_PHASES = r"""
import json, sys, time
import mlx.core as mx
from shared.api import load, build_messages
from shared.runtime import generate as G
from shared.runtime.sampling import SamplingParams
model_path, image, prompt, max_tokens, repeats = sys.argv[1:6]
model = load(model_path)
messages = build_messages(prompt, images=[image] if image != "-" else [])
lm = model.language
def prefill_split(inputs):  # what mlx-vlm does: n-1 tokens (only the KV cache kept), then 1
    ids, emb, pos = inputs.input_ids, inputs.input_embeddings, inputs.position_ids
    cut_emb = lambda s: None if emb is None else emb[:, s]  # (1, L, D)
    cut_pos = lambda s: None if pos is None else pos[..., s]  # (3, 1, L)
    cache = lm.make_cache()
    n = ids.shape[1]
    head = slice(0, n - 1)
    lm.model(ids[:, head], cache, cut_emb(head), cut_pos(head))
    mx.eval([c.state for c in cache])
    last = slice(n - 1, n)
    out = lm(ids[:, last], cache, input_embeddings=cut_emb(last), position_ids=cut_pos(last))
    mx.eval(mx.argmax(out[:, -1], -1))
for rep in range(int(repeats) + 1):  # the first pass warms up and is not printed
    t0 = time.perf_counter()
    p = model.processor(messages)
    t1 = time.perf_counter()
    feats = G.encode_media(model, p.media); mx.eval(feats)
    t2 = time.perf_counter()
    inputs = G.prepare_inputs(model, p, feats)
    mx.eval([x for x in (inputs.input_embeddings, inputs.position_ids) if x is not None])
    t3 = time.perf_counter()
    mx.eval(G.prefill(lm, inputs, lm.make_cache()))
    t4 = time.perf_counter()
    prefill_split(inputs)
    t5 = time.perf_counter()
    for c in G.stream_generate(model, p, max_tokens=int(max_tokens), sampling=SamplingParams()):
        last = c
    prompt_ms = 1e3 * last.prompt_tokens / last.prompt_tps
    print(json.dumps({"preprocess": 1e3 * (t1 - t0), "vision": 1e3 * (t2 - t1),
        "prompt": prompt_ms, "prefill": prompt_ms - 1e3 * (t2 - t1),
        "prefill_alone": 1e3 * (t4 - t3), "prefill_split_alone": 1e3 * (t5 - t4),
        "decode_ms_per_token": 1e3 / last.generation_tps, "tokens": last.generation_tokens})
        if rep else "")
"""

PEER_PHASES = r"""
import json, sys, time
import mlx.core as mx
from mlx_vlm import load
from mlx_vlm.prompt_utils import apply_chat_template
from mlx_vlm.generate.dispatch import _prepare_generation_inputs, stream_generate
model_path, image, prompt, max_tokens, repeats = sys.argv[1:6]
model, processor = load(model_path)
images = [image] if image != "-" else None
text = apply_chat_template(processor, model.config, prompt, num_images=len(images or []))
dtype = model.vision_tower.patch_embed.proj.weight.dtype
for rep in range(int(repeats) + 1):  # the first pass warms up and is not printed
    t0 = time.perf_counter()
    ids, pixels, mask, data = _prepare_generation_inputs(
        model, processor, text, images, None, None, {})
    mx.eval(ids) if pixels is None else mx.eval(ids, pixels)
    t1 = time.perf_counter()
    if pixels is not None:
        mx.eval(model.vision_tower(pixels.astype(dtype), data["image_grid_thw"],
                                   output_hidden_states=False))
    t2 = time.perf_counter()
    for r in stream_generate(model, processor, text, images, max_tokens=int(max_tokens),
                             temperature=0.0):
        last = r
    prompt_ms = 1e3 * last.prompt_tokens / last.prompt_tps
    print(json.dumps({"preprocess": 1e3 * (t1 - t0), "vision": 1e3 * (t2 - t1),
        "prompt": prompt_ms, "prefill": prompt_ms - 1e3 * (t2 - t1),
        "decode_ms_per_token": 1e3 / last.generation_tps, "tokens": last.generation_tokens})
        if rep else "")
"""

PHASE_ROWS = (
    ("image preprocessing (ms)", "preprocess"),
    ("vision tower, evaluated alone (ms)", "vision"),
    ("prompt = vision + prefill + 1st token (ms)", "prompt"),
    ("prefill = prompt - vision (ms)", "prefill"),
    ("prefill alone, as prism does it (ms)", "prefill_alone"),
    ("prefill alone, last token split off (ms)", "prefill_split_alone"),
    ("decode (ms / token)", "decode_ms_per_token"),
)


def phases(python: Path, code: str, args: list[str], cwd: Path) -> list[dict[str, float]]:
    proc = subprocess.run(
        [str(python), "-c", code, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    if proc.returncode != 0:
        sys.exit(f"phase timing failed:\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def phase_table(prism: list[dict[str, float]], peer: list[dict[str, float]]) -> str:
    lines = ["| phase | prism | mlx-vlm |", "|---|---|---|"]
    for label, key in PHASE_ROWS:
        cells = []
        for rows in (prism, peer):
            values = [r[key] for r in rows if key in r]
            digits = 2 if key.startswith("decode") else 0
            cells.append(_fmt(values, digits) if values else "-")
        lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
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


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
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


if __name__ == "__main__":
    raise SystemExit(main())
