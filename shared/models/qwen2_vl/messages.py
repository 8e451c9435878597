"""OpenAI-ish chat messages -> the form Qwen-VL chat templates expect, plus the media in order.

Accepted content parts: ``{"type": "text", "text": ...}``, ``{"type": "image", "image": src}``,
``{"type": "image_url", "image_url": {"url": ...} | str}``, ``{"type": "video", "video": src}``,
``{"type": "video_url", "video_url": {"url": ...} | str}``; bare strings count as text. Media
parts become ``{"type": "image"}`` / ``{"type": "video"}`` for the template (which only needs the
type to emit ``<|vision_start|><|image_pad|><|vision_end|>``), so sources never reach Jinja.
Per-part options in the qwen_vl_utils style (``fps``, ``num_frames``/``nframes``, ``min_frames``,
``max_frames``, ``min_pixels``, ``max_pixels``) are kept on the returned ``MediaRef``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shared.media.types import Modality
from shared.models.text_processor import MediaNotSupportedError

OPTION_KEYS = (
    "fps",
    "num_frames",
    "nframes",
    "min_frames",
    "max_frames",
    "min_pixels",
    "max_pixels",
)


@dataclass(frozen=True)
class MediaRef:
    """One media part as the client sent it, not yet loaded."""

    modality: Modality
    source: Any
    options: dict[str, Any] = field(default_factory=dict)


def _url(value: Any, key: str) -> Any:
    if isinstance(value, dict):
        if "url" not in value:
            raise ValueError(f"'{key}' part needs a 'url'")
        return value["url"]
    return value


def _media_ref(part: dict[str, Any], kind: str) -> MediaRef | None:
    """MediaRef for a media part, None for text. ``kind`` is the part's declared or implied type."""
    if kind in ("image", "video"):
        if kind not in part:
            raise ValueError(f"'{kind}' part needs an '{kind}' field with the source")
        source = part[kind]
    elif kind in ("image_url", "video_url"):
        if kind not in part:
            raise ValueError(f"'{kind}' part needs an '{kind}' field")
        source = _url(part[kind], kind)
    elif kind == "text":
        return None
    else:
        raise MediaNotSupportedError(
            f"unsupported content part type {kind!r}; this model accepts text, image and video"
        )
    options = {k: part[k] for k in OPTION_KEYS if k in part}
    modality: Modality = "image" if kind.startswith("image") else "video"
    return MediaRef(modality=modality, source=source, options=options)


def _part_kind(part: dict[str, Any]) -> str:
    if "type" in part:
        return str(part["type"])
    for key in (
        "image",
        "image_url",
        "video",
        "video_url",
    ):  # untyped parts, as the template allows
        if key in part:
            return key
    return "text"


def normalise_messages(
    messages: list[dict[str, Any]],
) -> tuple[list[dict[str, Any]], list[MediaRef]]:
    """Template-ready copies of ``messages`` and their media parts in prompt order."""
    out: list[dict[str, Any]] = []
    media: list[MediaRef] = []
    for message in messages:
        content = message.get("content")
        if content is None or isinstance(content, str):
            out.append({**message, "content": content or ""})
            continue
        parts: list[dict[str, Any]] = []
        for part in content:
            if isinstance(part, str):
                parts.append({"type": "text", "text": part})
                continue
            ref = _media_ref(part, _part_kind(part))
            if ref is None:
                parts.append({"type": "text", "text": part.get("text", "")})
            else:
                media.append(ref)
                parts.append({"type": ref.modality})
        out.append({**message, "content": parts})
    return out, media
