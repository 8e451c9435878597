"""TurboQuant's fixed random rotation: random signs, then the normalized Walsh-Hadamard
transform (a random orthogonal matrix for head sizes that are not powers of two).

Stored as the dense (d, d) matrix M that row vectors multiply (`x @ M`); its inverse is
`M.T`. At d = 128 that is 16k multiply-adds per vector, small next to attention itself.
"""

from __future__ import annotations

from functools import cache

import mlx.core as mx
import numpy as np

SEED = 20250425  # fixed: every process must rotate alike (cached blocks, replicas)


def hadamard(d: int) -> np.ndarray:
    """Sylvester's (d, d) +-1 Hadamard matrix; d a power of two."""
    h = np.ones((1, 1))
    while h.shape[0] < d:
        h = np.block([[h, h], [h, -h]])
    return h


@cache
def rotation_matrix(d: int, seed: int = SEED) -> np.ndarray:
    """(d, d) orthogonal float64 matrix: x @ M = WHT(signs * x) / sqrt(d)."""
    rng = np.random.default_rng(seed)
    if d & (d - 1) == 0:
        signs = rng.choice([-1.0, 1.0], size=d)
        return signs[:, None] * hadamard(d) / np.sqrt(d)
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))[None, :]  # Haar-distributed


@cache
def rotation(d: int, dtype: mx.Dtype = mx.float32) -> mx.array:
    return mx.array(rotation_matrix(d).astype(np.float32)).astype(dtype)
