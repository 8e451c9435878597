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

from generate_bench.cli import main  # bench/generate_bench/: prepare, runs, report, phases, cli

if __name__ == "__main__":
    raise SystemExit(main(description=__doc__))
