"""Prism's common library: models, loading, runtime, media, gRPC plumbing, testing.

Importing it first gives MLX's CPU backend a fast BLAS where one is installed (`cpu_blas`):
that must happen before `mlx.core` loads, and every Prism process imports this package first.
"""

from shared import cpu_blas

cpu_blas.install()
