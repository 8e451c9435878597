"""Content keys: what makes two encodings interchangeable.

key = sha256(model fingerprint, modality, effective preprocessing params, media bytes, tenant).
"Effective" means defaults are filled in, so an option spelled out at its default value hits the
same entry as the option left unset. Every field is length-prefixed so no two different inputs
can concatenate to the same byte stream.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

# Files whose bytes decide what the tower computes and how media is preprocessed.
FINGERPRINT_FILES = ("config.json", "preprocessor_config.json")

IMAGE_OPTIONS = ("min_pixels", "max_pixels")
VIDEO_OPTIONS = ("fps", "num_frames", "min_frames", "max_frames", "min_pixels", "max_pixels")


def model_fingerprint(path: str | Path) -> str:
    digest = hashlib.sha256()
    for name in FINGERPRINT_FILES:
        file = Path(path) / name
        data = file.read_bytes() if file.is_file() else b""
        _field(digest, name.encode())
        _field(digest, data)
    return digest.hexdigest()


def effective_params(processor: Any, modality: str, options: dict[str, float]) -> dict[str, Any]:
    """The preprocessing parameters actually used: explicit options over the processor defaults.

    Only options the modality uses are kept (an fps sent with an image changes nothing).
    """
    if modality == "audio":  # clips are resampled to the model's rate; no option changes that
        return {"sampling_rate": getattr(processor, "sampling_rate", None)}
    if modality == "image":
        size = getattr(getattr(processor, "image_processor", None), "size", None)
        defaults = {
            "min_pixels": getattr(size, "shortest_edge", None),
            "max_pixels": getattr(size, "longest_edge", None),
        }
        return {k: options.get(k, defaults[k]) for k in IMAGE_OPTIONS}
    video = getattr(processor, "video", None)
    params: dict[str, Any] = {
        "min_frames": options.get("min_frames", getattr(video, "min_frames", None)),
        "max_frames": options.get("max_frames", getattr(video, "max_frames", None)),
        "min_pixels": options.get("min_pixels", getattr(video, "min_pixels", None)),
        # None: the per-frame cap derived from the frame count (deterministic given the rest).
        "max_pixels": options.get("max_pixels"),
    }
    if "num_frames" in options:  # an exact frame count overrides fps
        params["num_frames"] = int(options["num_frames"])
    else:
        params["fps"] = float(options.get("fps", getattr(video, "fps", 2.0)))
    return params


def content_key(
    fingerprint: str, modality: str, params: dict[str, Any], data: bytes, tenant: str = ""
) -> str:
    digest = hashlib.sha256()
    for part in (
        fingerprint.encode(),
        modality.encode(),
        json.dumps(params, sort_keys=True, separators=(",", ":")).encode(),
        data,
        tenant.encode(),
    ):
        _field(digest, part)
    return digest.hexdigest()


def _field(digest: Any, data: bytes) -> None:
    digest.update(len(data).to_bytes(8, "little"))
    digest.update(data)
