"""The built-in demo checkpoint `make run-local` serves when no MODEL is given.

A tiny random Qwen2.5-VL in the mlx-community layout, written with MLX only: unlike the test
fixtures (which build the transformers model and so need torch), this runs on a runtime-only
install. Prism's own MLX modules are instantiated from the fixture config, every parameter is
re-drawn with `mx.random` (seeded), and the weights are saved under their canonical names.

Its output is noise. config.json carries `"prism_demo": true` so the services can say so
(`ModelInfo.random_weights`, shown by the gateway's `/v1/models`).

    python -m shared.testing.demo [OUT_DIR]   # prints the folder (default: the cache below)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from shared.models.registry import family_for
from shared.testing import mlx_convert
from shared.testing.fixtures import _write_sidecars, generation_config, legacy_config

FAMILY = "qwen2_5_vl"
DEMO_MODEL_NAME = "prism-demo"
DEMO_FLAG = "prism_demo"  # config.json key: the weights are random
# Bump when the generated files change, so stale caches are rebuilt rather than reused.
DEMO_VERSION = 1


def prism_home() -> Path:
    """$PRISM_HOME, else ~/.cache/prism."""
    return Path(os.environ.get("PRISM_HOME") or Path.home() / ".cache" / "prism").expanduser()


def default_demo_dir() -> Path:
    return prism_home() / "demo" / f"{FAMILY}-v{DEMO_VERSION}"


def _random_weights(module: Any, seed: int) -> dict[str, mx.array]:
    """Same scales as the torch fixtures' `_randomize`: matrices N(0, (1.5/sqrt(fan_in))^2),
    norm scales 1 + N(0, 0.1^2), biases N(0, 0.1^2). Default inits (norms at 1, biases at 0,
    tiny matrices) give near-tied logits, i.e. a demo that repeats one token forever."""
    params = dict(tree_flatten(module.parameters()))
    keys = mx.random.split(mx.random.key(seed), len(params))
    out: dict[str, mx.array] = {}
    for key, name in zip(keys, sorted(params), strict=True):
        shape = params[name].shape
        noise = mx.random.normal(shape, key=key)
        if len(shape) >= 2:
            fan_in = 1
            for s in shape[1:]:
                fan_in *= s
            out[name] = noise * (1.5 / fan_in**0.5)
        elif name.endswith("bias"):
            out[name] = noise * 0.1
        else:  # RMSNorm / LayerNorm scales
            out[name] = 1.0 + noise * 0.1
    mx.eval(out)
    return out


def _demo_config(size: str) -> dict[str, Any]:
    """config.json as mlx-vlm's convert writes it (generation config merged), plus the flag."""
    config = legacy_config(FAMILY, "float32", size)
    config = mlx_convert._mlx_config(config, generation_config(FAMILY), vlm=True)
    config[DEMO_FLAG] = True
    return dict(sorted(config.items()))


def make_demo_checkpoint(out_dir: Path, *, seed: int = 0, size: str = "tiny") -> Path:
    """Write the demo checkpoint to `out_dir` (created); return `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = _demo_config(size)
    family = family_for(config)
    assert family.vision is not None  # a VLM, so the demo exercises the encoder too
    weights: dict[str, mx.array] = {}
    # Canonical names: the loader strips these prefixes before each module's load_weights.
    for prefix, module, sub_seed in (
        ("vision_tower.", family.vision(config), seed * 2),
        ("language_model.", family.language(config), seed * 2 + 1),
    ):
        weights.update({prefix + k: v for k, v in _random_weights(module, sub_seed).items()})
    mlx_convert._save(out_dir, weights)
    (out_dir / "config.json").write_text(json.dumps(config, indent=4) + "\n")
    # Tokenizer (Hub/mlx-community files: `tokenizers` only, no transformers), chat template,
    # generation and pre-processor configs: the same sidecars as the test fixtures.
    _write_sidecars(FAMILY, out_dir, legacy=True, size=size)
    return out_dir


def demo_checkpoint(out_dir: Path | None = None) -> Path:
    """The cached demo checkpoint, generated on first use.

    Written to a temporary sibling and renamed into place, so a run interrupted half-way (or
    two launchers starting at once) never leaves a partial folder that looks complete.
    """
    target = Path(out_dir) if out_dir else default_demo_dir()
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        make_demo_checkpoint(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race; its copy is identical
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def is_demo_checkpoint(path: str | Path) -> bool:
    config = Path(path) / "config.json"
    try:
        return bool(json.loads(config.read_text()).get(DEMO_FLAG, False))
    except (OSError, ValueError):
        return False


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write Prism's random-weight demo checkpoint.")
    parser.add_argument("out_dir", nargs="?", type=Path, help=f"default: {default_demo_dir()}")
    args = parser.parse_args(argv)
    print(demo_checkpoint(args.out_dir))


if __name__ == "__main__":
    main()
