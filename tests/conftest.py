"""Session-wide tiny checkpoints: each (family, layout, seed, dtype) is generated once.

Usage:
    def test_x(checkpoint_factory):
        path = checkpoint_factory("qwen2_vl", "mlx-4bit")

    @pytest.mark.parametrize("checkpoint", [("qwen3", "hf")], indirect=True)
    def test_y(checkpoint): ...

The directories are shared by the whole session: treat them as read-only (copy first if a
test needs to edit files).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from shared.testing.fixtures import MLX_LAYOUTS, convert_checkpoint, make_checkpoint

CheckpointFactory = Callable[..., Path]


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory: pytest.TempPathFactory) -> CheckpointFactory:
    root = tmp_path_factory.mktemp("checkpoints")
    cache: dict[tuple, Path] = {}

    def get(family: str, layout: str = "hf", *, seed: int = 0, dtype: str = "float32") -> Path:
        key = (family, layout, seed, dtype)
        if key not in cache:
            out = root / f"{family}-{layout}-seed{seed}-{dtype}"
            if layout in MLX_LAYOUTS:  # convert the cached Hub-layout checkpoint, as users do
                convert_checkpoint(get(family, "hf-legacy", seed=seed, dtype=dtype), out, layout)
            else:
                make_checkpoint(family, out, layout, seed=seed, dtype=dtype)
            cache[key] = out
        return cache[key]

    return get


@pytest.fixture
def checkpoint(request: pytest.FixtureRequest, checkpoint_factory: CheckpointFactory) -> Path:
    """Indirect parametrization: `(family, layout)` or just `family` (layout "hf")."""
    param = getattr(request, "param", ("qwen2_vl", "hf"))
    family, layout = (param, "hf") if isinstance(param, str) else param
    return checkpoint_factory(family, layout)
