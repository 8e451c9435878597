"""OpenAI-ish chat messages -> the form the Qwen2-Audio chat template expects, plus the clips.

Accepted content parts: ``{"type": "text", "text": ...}``, ``{"type": "audio", "audio": src}``,
``{"type": "audio_url", "audio_url": {"url": ...} | str}`` and OpenAI's
``{"type": "input_audio", "input_audio": {"data": <base64>, "format": "wav"|"mp3"|"flac"}}``;
bare strings count as text. Audio parts become ``{"type": "audio", "audio": ""}``: the published
template tests for the ``audio`` key to emit ``Audio N: <|audio_bos|><|AUDIO|><|audio_eos|>``,
and sources never reach Jinja.
"""

from __future__ import annotations

from typing import Any

from shared.models.chat_messages import MediaRef, not_accepted, part_kind, walk_messages

AUDIO_FORMATS = ("wav", "mp3", "flac")


def _source(part: dict[str, Any], kind: str) -> Any:
    value = part.get(kind)
    if value is None:
        raise ValueError(f"'{kind}' part needs an '{kind}' field")
    if kind == "input_audio":
        if not isinstance(value, dict) or not isinstance(value.get("data"), str):
            raise ValueError("'input_audio' needs {'data': <base64>, 'format': ...}")
        fmt = value.get("format")
        if fmt is not None and fmt not in AUDIO_FORMATS:
            raise ValueError(f"input_audio format must be one of {', '.join(AUDIO_FORMATS)}")
        return value["data"]
    if isinstance(value, dict):
        if "url" not in value:
            raise ValueError(f"'{kind}' part needs a 'url'")
        return value["url"]
    return value


# Untyped parts (as the template allows) are named by these keys; the image and video ones
# only so that they are refused by name rather than read as empty text.
_UNTYPED = ("audio", "audio_url", "input_audio", "image", "image_url", "video")


def _template_part(part: dict[str, Any]) -> tuple[dict[str, Any], MediaRef | None]:
    kind = part_kind(part, _UNTYPED)
    if kind == "text":
        return {"type": "text", "text": part.get("text", "")}, None
    if kind in ("audio", "audio_url", "input_audio"):
        ref = MediaRef(modality="audio", source=_source(part, kind))
        return {"type": "audio", "audio": ""}, ref
    raise not_accepted(kind.removesuffix("_url").removeprefix("input_"), ("text", "audio"))


def normalise_messages(
    messages: list[dict[str, Any]],
) -> tuple[list[dict[str, Any]], list[MediaRef]]:
    """Template-ready copies of ``messages`` and their audio parts in prompt order."""
    return walk_messages(messages, _template_part)
