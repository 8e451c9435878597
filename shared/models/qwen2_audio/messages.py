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

from shared.models.qwen2_vl.messages import MediaRef
from shared.models.text_processor import MediaNotSupportedError

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


def _kind(part: dict[str, Any]) -> str:
    if "type" in part:
        return str(part["type"])
    for key in ("audio", "audio_url", "input_audio", "image", "image_url", "video"):
        if key in part:  # untyped parts, as the template allows
            return key
    return "text"


def normalise_messages(
    messages: list[dict[str, Any]],
) -> tuple[list[dict[str, Any]], list[MediaRef]]:
    """Template-ready copies of ``messages`` and their audio parts in prompt order."""
    out: list[dict[str, Any]] = []
    clips: list[MediaRef] = []
    for message in messages:
        content = message.get("content")
        if content is None or isinstance(content, str):
            out.append({**message, "content": content or ""})
            continue
        parts: list[dict[str, Any]] = []
        for part in content:
            kind = "text" if isinstance(part, str) else _kind(part)
            if kind == "text":
                text = part if isinstance(part, str) else part.get("text", "")
                parts.append({"type": "text", "text": text})
            elif kind in ("audio", "audio_url", "input_audio"):
                clips.append(MediaRef(modality="audio", source=_source(part, kind)))
                parts.append({"type": "audio", "audio": ""})
            else:
                modality = kind.removesuffix("_url").removeprefix("input_")
                raise MediaNotSupportedError(
                    f"this model does not accept {modality} input; it accepts: text, audio"
                )
        out.append({**message, "content": parts})
    return out, clips
