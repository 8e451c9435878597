"""One run of either tool: its command line, the process, the stats parsed from its output."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import REPO

PRISM = REPO / ".venv" / "bin" / "prism"
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


# `prism` with torch made unimportable, as in a runtime install without the test extras
# (transformers imports torch whenever it is installed).
PRISM_NO_TORCH = (
    "import sys; sys.modules['torch'] = None; from services.cli import main; sys.exit(main())"
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
