"""`prism generate` end to end in a subprocess, and the loader's one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from shared.api import generate, load
from tests.media_samples import sample_image

# The console script installed next to this interpreter (pyproject's [project.scripts]).
PRISM = str(Path(sys.executable).with_name("prism"))


def run_prism(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PRISM, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def test_generate_with_image_prints_only_the_text(checkpoint_factory, tmp_path):
    path = checkpoint_factory("qwen2_5_vl", "hf")
    image = sample_image(tmp_path / "a.png", 112, 84, 0)
    args = ["generate", "--model", str(path), "--prompt", "Describe it.", "--max-tokens", "12"]
    proc = run_prism(*args, "--image", image, "--seed", "0", "--verbose")
    assert proc.returncode == 0, proc.stderr
    expected = generate(load(path), "Describe it.", images=[image], max_tokens=12)
    assert proc.stdout == expected + "\n"
    assert "Prompt:" in proc.stderr and "tokens-per-sec" in proc.stderr
    assert "Peak memory:" in proc.stderr


def test_generate_sampling_is_seeded(checkpoint_factory):
    path = str(checkpoint_factory("qwen3", "hf"))
    args = ["generate", "--model", path, "--prompt", "Hi", "--max-tokens", "16"]
    sampled = [*args, "--temperature", "1.0", "--top-p", "0.9", "--seed", "7"]
    a, b = run_prism(*sampled), run_prism(*sampled)
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout


def test_offline_missing_model_is_one_line(tmp_path):
    proc = run_prism(
        "generate",
        "--model",
        "nobody/no-such-model",
        "--prompt",
        "hi",
        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)},
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "HF_HUB_OFFLINE" in lines[0], proc.stderr


def test_unknown_architecture_names_the_supported_ones(checkpoint_factory, tmp_path):
    src = checkpoint_factory("qwen2", "hf")
    dst = tmp_path / "weird"
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(model_type="mamba9", architectures=["Mamba9ForCausalLM"])
    (dst / "config.json").write_text(json.dumps(config))
    proc = run_prism("generate", "--model", str(dst), "--prompt", "hi")
    assert proc.returncode == 2
    assert "mamba9" in proc.stderr and "qwen2_5_vl" in proc.stderr


def test_text_model_refuses_images(checkpoint_factory, tmp_path):
    path = checkpoint_factory("llama", "hf")
    image = sample_image(tmp_path / "a.png", 56, 56, 0)
    with pytest.raises(ValueError, match="accepts: text"):
        generate(load(path), "hi", images=[image], max_tokens=2)
