"""The built-in demo checkpoint: MLX only, loads through the normal path, output not degenerate."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from shared.api import LoadedModel, load, stream_generate
from shared.testing.demo import (
    DEMO_FLAG,
    demo_checkpoint,
    is_demo_checkpoint,
    make_demo_checkpoint,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_checkpoint(tmp_path_factory.mktemp("demo") / "ckpt")


def _token_ids(model: LoadedModel, prompt: str, **kwargs: Any) -> list[int]:
    chunks = list(stream_generate(model, prompt, max_tokens=24, **kwargs))
    assert chunks[-1].finish_reason in ("length", "stop")
    return [c.token for c in chunks if c.token is not None]


def test_loads_and_generates_varied_tokens(demo: Path, tmp_path: Path) -> None:
    """Random weights with a sensible scale: many distinct tokens, and the image matters."""
    model = load(demo)
    assert model.is_multimodal and model.config["model_type"] == "qwen2_5_vl"
    assert len(set(_token_ids(model, "Hello, who are you?"))) >= 8
    outputs = []
    for seed in (0, 1):
        pixels = np.random.default_rng(seed).integers(0, 255, (56, 84, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"{seed}.png")
        prompt = "What is in this picture?"
        outputs.append(_token_ids(model, prompt, images=[str(tmp_path / f"{seed}.png")]))
    assert all(len(set(ids)) >= 8 for ids in outputs)
    assert outputs[0] != outputs[1]


def test_halves_load_alone_and_layout_is_canonical(demo: Path) -> None:
    index = json.loads((demo / "model.safetensors.index.json").read_text())
    prefixes = {k.split(".")[0] for k in index["weight_map"]}
    assert prefixes == {"vision_tower", "language_model"}
    assert load(demo, components=["vision"]).language is None
    assert load(demo, components=["language"]).vision is None


def test_marked_as_random_weights(demo: Path) -> None:
    assert json.loads((demo / "config.json").read_text())[DEMO_FLAG] is True
    assert is_demo_checkpoint(demo)
    assert not is_demo_checkpoint(demo.parent)  # no config.json there


def test_deterministic(demo: Path, tmp_path: Path) -> None:
    again = make_demo_checkpoint(tmp_path / "again")
    assert (again / "model.safetensors").read_bytes() == (demo / "model.safetensors").read_bytes()


def test_cached_under_prism_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRISM_HOME", str(tmp_path / "home"))
    first = demo_checkpoint()
    assert first.is_relative_to(tmp_path / "home" / "demo")
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert demo_checkpoint() == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rewritten
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temp leftovers


def test_needs_no_torch(tmp_path: Path) -> None:
    """`make run-local` installs runtime dependencies only: generating must not import torch."""
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['torchvision'] = None\n"
        "from shared.testing.demo import main; main([sys.argv[1]])\n"
        "assert 'torch' not in {m.split('.')[0] for m, v in sys.modules.items() if v}\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "d")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(tmp_path / "d")
    assert (tmp_path / "d" / "config.json").exists()
