"""Give MLX's CPU backend a fast BLAS on Linux x86_64 (Intel MKL from PyPI).

MLX's Linux CPU wheel links the Netlib reference BLAS (`mlx_cpu.libs/libblas-*.so.3.10.0`) and
runs every float32 matmul through its `cblas_sgemm`: ~2.5 GFLOP/s on a 2-core x86 VM, where
MKL gives ~90 (one thread) to ~175 (two) on the same shapes (bench/NOTES.md, "CPU BLAS").
Loading `libmkl_rt` with RTLD_GLOBAL before `mlx.core` is imported puts MKL's `cblas_sgemm`
first in the process's global symbol scope, so libmlx binds to it when it loads; MLX itself
is unchanged. Half-precision matmuls never reach BLAS (MLX has its own, slower kernels for
them), which is why the loader computes in float32 on the CPU when this is active
(`shared.runtime.loaded.auto_dtype`).

`shared/__init__.py` calls `install()`, so any process that imports Prism code before MLX gets
it. Off with PRISM_CPU_BLAS=off. Threads: MKL_THREADING_LAYER defaults to SEQUENTIAL here (one
core per process: the encoder and the decoder each keep their own core, no OpenMP runtime
spinning against the other process or clashing with torch's in tests); set
MKL_THREADING_LAYER=GNU (and MKL_NUM_THREADS) to let one process use every core.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
from pathlib import Path

_state: dict[str, str] = {"status": "not tried"}


def _candidates() -> list[Path]:
    """Where pip puts the `mkl` wheel's libraries: `<prefix>/lib` of the venv or the base."""
    roots = dict.fromkeys([sys.prefix, sys.base_prefix, sys.exec_prefix])
    found: list[Path] = []
    for root in roots:
        found += sorted(Path(root, "lib").glob("libmkl_rt.so*"), reverse=True)
    return found


def install() -> str:
    """Load MKL for MLX's CPU matmuls if it is installed and still in time; returns a status
    line (also kept for `status()`)."""
    if _state["status"] != "not tried":
        return _state["status"]
    _state["status"] = _install()
    return _state["status"]


def _install() -> str:
    if os.environ.get("PRISM_CPU_BLAS", "auto").lower() in ("off", "0", "false", "no"):
        return "off (PRISM_CPU_BLAS)"
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return "not needed (MLX's own BLAS on this platform)"
    if "mlx.core" in sys.modules:
        return "too late: mlx.core was imported before shared (reference BLAS in use)"
    libs = _candidates()
    if not libs:
        return "MKL not installed (pip install mkl): reference BLAS in use"
    os.environ.setdefault("MKL_THREADING_LAYER", "SEQUENTIAL")
    try:
        ctypes.CDLL(str(libs[0]), mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        return f"MKL failed to load ({exc}): reference BLAS in use"
    return f"active: {libs[0].name} ({os.environ['MKL_THREADING_LAYER'].lower()} threading)"


def status() -> str:
    return _state["status"]


def active() -> bool:
    return _state["status"].startswith("active")
