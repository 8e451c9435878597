"""`prism generate` vs `mlx_vlm.generate` on one checkpoint, one process per run.

The entry point is `bench/generate_vs_mlx_vlm.py` (its docstring says what is measured and how):
- `prepare`: the peer's virtualenv, the checkpoint and the image;
- `runs`: both tools' command lines, one run and the stats parsed from its output;
- `report`: the comparison table (medians, ratios, identical text);
- `phases`: time per phase inside each tool (--phases);
- `cli`: flags and the main flow.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
