"""Write a random-weight checkpoint of a supported family, in any on-disk layout, for benchmarks.

    .venv/bin/python bench/make_checkpoint.py --family qwen2_5_vl --size small \\
        --layout hf-legacy --dtype bfloat16 --out /tmp/small

Sizes, layouts and weights are those of the test fixtures (`shared/testing/fixtures.py`):
"tiny" is the test model, "small" a 512-wide, 8-layer LM with a 4-block ViT. The tokenizer is the
fixtures' trained byte-level BPE, so the vocabulary (and the embedding) is a few hundred rows.
Needs the test extras (torch, transformers), as `make test` installs.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from shared.testing.fixtures import DTYPES, FAMILIES, LAYOUTS, SIZES, make_checkpoint


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--family", choices=FAMILIES, default="qwen2_5_vl")
    p.add_argument("--size", choices=tuple(SIZES), default="small")
    p.add_argument("--layout", choices=LAYOUTS, default="hf-legacy")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="output folder (created)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    out = make_checkpoint(
        args.family, args.out, args.layout, seed=args.seed, dtype=args.dtype, size=args.size
    )
    files = {f.name: f.stat().st_size for f in sorted(out.iterdir())}
    summary = {k: vars(args)[k] for k in ("family", "size", "layout", "dtype", "seed")}
    print(json.dumps({"out": str(out), **summary, "files": files}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
