"""MLX's CPU float32 matmuls run on MKL when it is installed (`shared.cpu_blas`), and the loader
computes in float32 on the CPU then. Each case runs in a fresh interpreter: the library has to
be in place before `mlx.core` loads, which this test process did long ago."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from shared import cpu_blas

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or platform.machine() != "x86_64",
    reason="MLX brings a fast BLAS of its own elsewhere (Accelerate on macOS)",
)

_MATMULS = """
import numpy as np, shared, mlx.core as mx
from shared import cpu_blas
rng = np.random.default_rng(0)
a, b = rng.standard_normal((37, 64), np.float32), rng.standard_normal((48, 64), np.float32)
c = rng.standard_normal((3, 5, 64), np.float32)
got = [mx.array(a) @ mx.array(b).T, mx.array(a).T @ mx.array(a), mx.array(c) @ mx.array(b).T]
want = [a @ b.T, a.T @ a, c @ b.T]
for g, w in zip(got, want):
    np.testing.assert_allclose(np.array(g), w, rtol=1e-4, atol=1e-4)
print("STATUS", cpu_blas.status())
"""


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if k not in ("PRISM_CPU_BLAS", "MKL_VERBOSE")}
    return subprocess.run(
        [sys.executable, "-c", code], env=full | env, capture_output=True, text=True, timeout=120
    )


def _status(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode == 0, out.stderr
    return next(line for line in out.stdout.splitlines() if line.startswith("STATUS "))[7:]


needs_mkl = pytest.mark.skipif(not cpu_blas._candidates(), reason="mkl is not installed")


@needs_mkl
def test_mlx_float32_matmuls_run_on_mkl_and_agree_with_numpy() -> None:
    # MKL_VERBOSE makes MKL print every call it serves: proof that libmlx bound to it.
    out = _python(_MATMULS, MKL_VERBOSE="1")
    assert _status(out).startswith("active: libmkl_rt"), out.stdout
    assert out.stdout.count("SGEMM") >= 3, out.stdout


def test_off_switch_keeps_the_reference_blas() -> None:
    out = _python(_MATMULS, PRISM_CPU_BLAS="off", MKL_VERBOSE="1")
    assert _status(out) == "off (PRISM_CPU_BLAS)"
    assert "SGEMM" not in out.stdout


@needs_mkl
def test_importing_mlx_first_is_reported_as_too_late() -> None:
    out = _python("import mlx.core\n" + _MATMULS, MKL_VERBOSE="1")
    assert _status(out).startswith("too late"), out.stdout
    assert "SGEMM" not in out.stdout


_LOAD = """
import sys, shared
from mlx.utils import tree_flatten
from shared.api import load
for dtype in (None, "bfloat16"):
    m = load(sys.argv[1], dtype=dtype)
    kinds = {str(v.dtype) for mod in (m.vision, m.language)
             for _, v in tree_flatten(mod.parameters())}
    print("DTYPES", dtype, sorted(kinds))
"""


@needs_mkl
def test_half_precision_checkpoints_compute_in_float32_on_the_cpu(checkpoint_factory) -> None:
    path = checkpoint_factory("qwen2_5_vl", "hf", dtype="bfloat16")
    out = subprocess.run(
        [sys.executable, "-c", _LOAD, str(path)], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if line.startswith("DTYPES")]
    assert lines == [
        "DTYPES None ['mlx.core.float32']",  # auto: float32 on the CPU with MKL
        "DTYPES bfloat16 ['mlx.core.bfloat16']",  # an explicit --dtype wins
    ], out.stdout


@needs_mkl
@pytest.mark.parametrize("entry", ["services.encoder.__main__", "services.decoder.__main__"])
def test_service_entry_points_get_mkl(entry: str) -> None:
    # `python -m services.X` imports mlx.core through its first modules: the services package
    # has to load shared (and MKL) before that.
    code = f"import {entry}\nfrom shared import cpu_blas\nprint('STATUS', cpu_blas.status())"
    out = _python(code)
    assert _status(out).startswith("active"), out.stdout
