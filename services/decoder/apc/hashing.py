"""Prefix block keys: what makes two prompts' KV for a block interchangeable.

A prompt is cut into whole blocks of `block_size` tokens. Block i's key hashes block i-1's key,
the block's token ids and the content keys of the media whose placeholder tokens fall in it; the
chain starts from a root that hashes the model's identity and the tenant salt. So a key names
the whole prefix up to the end of its block: equal keys mean equal KV (the rotary positions,
M-RoPE included, are a function of that prefix), and no tenant can produce another's keys.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

HASHES = ("xxhash", "sha256")
_SAMPLE_BYTES = 1 << 20  # bytes of each weight file that go into the model identity


@dataclass(frozen=True)
class MediaSpan:
    """One media item's placeholder tokens: prompt positions [start, end), its content key."""

    start: int
    end: int
    key: str


def _hasher(name: str) -> Callable[[], Any]:
    if name == "xxhash":  # fast, non-cryptographic (the default, as in vLLM)
        return xxhash.xxh3_128
    if name == "sha256":
        return hashlib.sha256
    raise ValueError(f"unknown APC hash {name!r}; choose one of {', '.join(HASHES)}")


def _field(digest: Any, data: bytes) -> None:
    """Length-prefixed, so no two field lists concatenate to the same bytes."""
    digest.update(len(data).to_bytes(8, "little"))
    digest.update(data)


def model_identity(path: Path, config: dict[str, Any], kv_dtype: str) -> str:
    """The model's config, the KV dtype and a sample of every weight file: two checkpoints of
    one architecture (a fine-tune) never share blocks, two replicas of one checkpoint do."""
    digest = hashlib.sha256()
    _field(digest, json.dumps(config, sort_keys=True).encode())
    _field(digest, kv_dtype.encode())
    for file in sorted(Path(path).glob("*.safetensors")):
        _field(digest, file.name.encode())
        _field(digest, str(file.stat().st_size).encode())
        with file.open("rb") as f:
            _field(digest, f.read(_SAMPLE_BYTES))
    return digest.hexdigest()


def root_key(model_id: str, block_size: int, tenant: str, hash_name: str) -> str:
    digest = _hasher(hash_name)()
    for part in ("prism-apc-v1", model_id, str(block_size), tenant):
        _field(digest, part.encode())
    return digest.hexdigest()


def block_keys(
    tokens: Sequence[int],
    media: Sequence[MediaSpan],
    root: str,
    block_size: int,
    hash_name: str = "xxhash",
) -> list[str]:
    """One key per whole block of `tokens`, each chaining the previous one."""
    new = _hasher(hash_name)
    ids = np.asarray(tokens, dtype=np.int32)
    keys, parent = [], root
    for start in range(0, len(ids) - block_size + 1, block_size):
        end = start + block_size
        digest = new()
        _field(digest, parent.encode())
        _field(digest, ids[start:end].tobytes())
        for span in media:
            if span.start < end and span.end > start:
                _field(digest, span.key.encode())
        parent = digest.hexdigest()
        keys.append(parent)
    return keys


def media_spans(
    tokens: Sequence[int], placeholder_ids: Sequence[int], items: Sequence[tuple[str, int]]
) -> list[MediaSpan]:
    """Spans of `items` ((content key, token count), in prompt order) over the placeholder
    tokens: item k takes the next `count` placeholder positions."""
    if not items:
        return []
    positions = np.flatnonzero(np.isin(np.asarray(tokens), list(placeholder_ids)))
    spans, used = [], 0
    for key, count in items:
        if count <= 0 or used + count > len(positions):
            raise ValueError("the prompt's placeholder tokens do not match its media")
        spans.append(MediaSpan(int(positions[used]), int(positions[used + count - 1]) + 1, key))
        used += count
    return spans
