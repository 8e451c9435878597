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

from typing import Any

from shared.media.types import Modality
from shared.models.chat_messages import MediaNotSupportedError, MediaRef, part_kind, walk_messages

OPTION_KEYS = (
    "fps",
    "num_frames",
    "nframes",
    "min_frames",
    "max_frames",
    "min_pixels",
    "max_pixels",
)


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


_UNTYPED = ("image", "image_url", "video", "video_url")


def _template_part(part: dict[str, Any]) -> tuple[dict[str, Any], MediaRef | None]:
    ref = _media_ref(part, part_kind(part, _UNTYPED))
    if ref is None:
        return {"type": "text", "text": part.get("text", "")}, None
    return {"type": ref.modality}, ref


def normalise_messages(
    messages: list[dict[str, Any]],
) -> tuple[list[dict[str, Any]], list[MediaRef]]:
    """Template-ready copies of ``messages`` and their media parts in prompt order."""
    return walk_messages(messages, _template_part)
