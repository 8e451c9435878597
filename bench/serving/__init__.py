"""Prism's OpenAI server vs `mlx_vlm.server` under the same streaming load.

The entry point is `bench/serve_vs_mlx_vlm.py` (its docstring says what is measured and how):
- `servers`: starting, probing, stopping and restarting both servers;
- `load`: request bodies and the concurrent streaming client, with per-request timings;
- `report`: per-level statistics, the tables and the Prism / mlx-vlm ratios;
- `context`: the run's header (machine, checkpoint, versions, Prism's source);
- `cli`: flags and the main flow.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
