"""Inputs of a run: the peer's virtualenv, the checkpoint and the image."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from . import REPO

PEER_PACKAGES = ("mlx-vlm==0.7.10", "mlx[cpu]==0.32.4")


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
