"""Prism's gRPC services, the gateway, the launcher and the `prism` command line."""

# Before any service module imports mlx.core: gives MLX's CPU backend its fast BLAS
# (shared/cpu_blas.py; too late once mlx.core is loaded).
import shared  # noqa: F401
