"""OpenAI chat messages and Responses-API input -> one internal message list.

Both APIs' content parts land in the same `Part` (text or a `MediaSpec` still to be loaded), so
media loading, encoding and the decoder request are written once.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from services.gateway.schemas import ChatMessageIn, ResponsesRequest
from shared.errors import InvalidRequestError

ROLES = {"system", "developer", "user", "assistant", "tool"}
TEXT_TYPES = {"text", "input_text", "output_text"}
MEDIA_TYPES = {
    "image_url": ("image", "image_url"),
    "input_image": ("image", "image_url"),
    "image": ("image", "image"),
    "video_url": ("video", "video_url"),
    "input_video": ("video", "video_url"),
    "video": ("video", "video"),
    "audio_url": ("audio", "audio_url"),
}
# input_audio formats: what PyAV decodes for us (OpenAI documents wav and mp3).
AUDIO_FORMATS = ("wav", "mp3", "flac")
# Per-item preprocessing options a part may carry (MediaOptions fields).
OPTION_KEYS = ("min_pixels", "max_pixels", "fps", "min_frames", "max_frames", "num_frames")


@dataclass
class MediaSpec:
    modality: str  # "image" | "video" | "audio"
    param: str  # where it came from, for error messages
    source: str | None = None  # URL, data: URI, file:// URL or path
    b64: str | None = None  # inline base64 (input_audio)
    options: dict[str, float] = field(default_factory=dict)


@dataclass
class Part:
    text: str | None = None
    media: MediaSpec | None = None


@dataclass
class Message:
    role: str
    parts: list[Part]
    name: str = ""
    tool_call_id: str = ""
    tool_calls_json: str = ""
    reasoning_content: str = ""


def _url_of(value: Any, param: str) -> str:
    if isinstance(value, dict):
        value = value.get("url")
    if not isinstance(value, str) or not value.strip():
        raise InvalidRequestError(f"{param}: expected a URL string or {{'url': ...}}", param=param)
    return value.strip()


def _options(part: dict[str, Any], param: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for key in OPTION_KEYS:
        value = part.get(key)
        if value is None:
            continue
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok or not math.isfinite(value) or not 0 <= value < 2**31:
            raise InvalidRequestError(f"{param}.{key} must be a non-negative number", param=param)
        out[key] = float(value)
    return out


def _input_audio(part: dict[str, Any], param: str) -> MediaSpec:
    """OpenAI's `{"input_audio": {"data": <base64>, "format": "wav"|"mp3"|...}}`. The format is
    only checked against what we decode: the encoder judges the bytes themselves."""
    audio = part.get("input_audio", part)
    data = audio.get("data") if isinstance(audio, dict) else None
    if not isinstance(data, str):
        raise InvalidRequestError(f"{param}.input_audio.data must be base64 text", param=param)
    fmt = audio.get("format")
    if fmt is not None and fmt not in AUDIO_FORMATS:
        raise InvalidRequestError(
            f"{param}.input_audio.format must be one of {', '.join(AUDIO_FORMATS)}", param=param
        )
    return MediaSpec("audio", param, b64=data, options=_options(part, param))


def _part(part: Any, param: str) -> Part:
    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        raise InvalidRequestError(f"{param}: a content part needs a 'type'", param=param)
    kind = part["type"]
    if kind in TEXT_TYPES or kind == "refusal":
        text = part.get("refusal" if kind == "refusal" else "text")
        if not isinstance(text, str):
            raise InvalidRequestError(f"{param}.text must be a string", param=param)
        return Part(text=text)
    if kind in MEDIA_TYPES:
        modality, key = MEDIA_TYPES[kind]
        source = _url_of(part.get(key), f"{param}.{key}")
        return Part(media=MediaSpec(modality, param, source=source, options=_options(part, param)))
    if kind == "input_audio":
        return Part(media=_input_audio(part, param))
    raise InvalidRequestError(f"{param}: unsupported content part type {kind!r}", param=param)


def parse_content(content: Any, param: str) -> list[Part]:
    if content is None:
        return []
    if isinstance(content, str):
        return [Part(text=content)]
    if not isinstance(content, list):
        raise InvalidRequestError(f"{param} must be a string or a list of parts", param=param)
    return [_part(p, f"{param}[{i}]") for i, p in enumerate(content)]


def _role(role: Any, param: str) -> str:
    if role not in ROLES:
        raise InvalidRequestError(
            f"{param}: unknown role {role!r}; expected one of {sorted(ROLES)}", param=param
        )
    return "system" if role == "developer" else role  # chat templates know "system"


def chat_messages(messages: list[ChatMessageIn]) -> list[Message]:
    out = []
    for i, m in enumerate(messages):
        out.append(
            Message(
                role=_role(m.role, f"messages[{i}].role"),
                parts=parse_content(m.content, f"messages[{i}].content"),
                name=m.name or "",
                tool_call_id=m.tool_call_id or "",
                tool_calls_json=json.dumps(m.tool_calls) if m.tool_calls else "",
                reasoning_content=m.reasoning_content or "",
            )
        )
    return out


def _input_item(item: dict[str, Any], param: str) -> Message | None:
    kind = item.get("type", "message")
    if kind == "message":
        return Message(
            role=_role(item.get("role"), f"{param}.role"),
            parts=parse_content(item.get("content"), f"{param}.content"),
        )
    if kind == "function_call":
        call = {
            "id": item.get("call_id", ""),
            "type": "function",
            "function": {"name": item.get("name", ""), "arguments": item.get("arguments", "")},
        }
        return Message(role="assistant", parts=[], tool_calls_json=json.dumps([call]))
    if kind == "function_call_output":
        output = item.get("output", "")
        parts = parse_content(output, f"{param}.output")
        return Message(role="tool", parts=parts, tool_call_id=str(item.get("call_id", "")))
    if kind == "reasoning":
        return None  # earlier reasoning is not replayed into the prompt
    raise InvalidRequestError(f"{param}: unsupported input item type {kind!r}", param=param)


def responses_messages(req: ResponsesRequest) -> list[Message]:
    out: list[Message] = []
    if req.instructions:
        out.append(Message(role="system", parts=[Part(text=req.instructions)]))
    if isinstance(req.input, str):
        out.append(Message(role="user", parts=[Part(text=req.input)]))
    else:
        for i, item in enumerate(req.input):
            msg = _input_item(item, f"input[{i}]")
            if msg is not None:
                out.append(msg)
    if not any(m.role != "system" for m in out):
        raise InvalidRequestError("input must contain at least one message", param="input")
    return out


def media_specs(messages: list[Message]) -> list[MediaSpec]:
    return [p.media for m in messages for p in m.parts if p.media is not None]
