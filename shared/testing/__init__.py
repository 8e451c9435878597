"""Tiny random checkpoints in real on-disk formats (test-only; torch is imported lazily)."""

from .fixtures import (
    FAMILIES,
    LAYOUTS,
    VLM_FAMILIES,
    convert_checkpoint,
    legacy_config,
    make_checkpoint,
    token_ids,
)

__all__ = [
    "FAMILIES",
    "LAYOUTS",
    "VLM_FAMILIES",
    "convert_checkpoint",
    "legacy_config",
    "make_checkpoint",
    "token_ids",
]
