"""Read config.json and normalise the layouts checkpoints are published in.

Three shapes occur for the same model: transformers-4 (text fields at the root,
`rope_scaling`), transformers-5 (`text_config` / `vision_config`, `rope_parameters`) and
mlx-community (either of those plus `quantization: {group_size, bits}`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUB_CONFIGS = ("text_config", "vision_config", "audio_config")


@dataclass(frozen=True)
class Quantization:
    group_size: int
    bits: int
    mode: str = "affine"


def load_config(model_path: Path) -> dict[str, Any]:
    path = Path(model_path) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_path} has no config.json")
    with open(path) as f:
        return json.load(f)


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language model's fields as one flat dict.

    Root fields serve as defaults (transformers-4 layout keeps everything there);
    `text_config` wins where both exist (transformers-5 keeps the truth there).
    """
    root = {k: v for k, v in config.items() if k not in SUB_CONFIGS}
    # A null in text_config means "not set here" (transformers-5 writes some), not an override.
    nested = {k: v for k, v in (config.get("text_config") or {}).items() if v is not None}
    return {**root, **nested}


def vision_config(config: dict[str, Any]) -> dict[str, Any]:
    return dict(config.get("vision_config", {}))


def quantization(config: dict[str, Any]) -> Quantization | None:
    q = config.get("quantization")
    if not q:
        return None
    return Quantization(
        group_size=int(q["group_size"]), bits=int(q["bits"]), mode=q.get("mode", "affine")
    )


def eos_token_ids(model_path: Path, config: dict[str, Any]) -> set[int]:
    """EOS ids from config.json and generation_config.json (chat models stop on several)."""
    ids: set[int] = set()
    sources = [text_config(config)]
    gen_path = Path(model_path) / "generation_config.json"
    if gen_path.is_file():
        with open(gen_path) as f:
            sources.append(json.load(f))
    for src in sources:
        eos = src.get("eos_token_id")
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, list):
            ids.update(int(e) for e in eos)
    return ids
