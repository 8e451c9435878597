"""What every processor shares when it reads OpenAI-ish chat messages: the media reference a
content part becomes, the error for a modality the model does not take, and the walk over the
messages that each family's own per-part rule plugs into."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from shared.media.types import Modality


class MediaNotSupportedError(ValueError):
    """A request carried a modality this model does not accept."""


@dataclass(frozen=True)
class MediaRef:
    """One media part as the client sent it, not yet loaded."""

    modality: Modality
    source: Any
    options: dict[str, Any] = field(default_factory=dict)


def not_accepted(modality: str, accepted: Iterable[str]) -> MediaNotSupportedError:
    """The error for `modality` on a model taking only `accepted` (text included)."""
    return MediaNotSupportedError(
        f"this model does not accept {modality} input; it accepts: {', '.join(accepted)}"
    )


def refuse_unaccepted(refs: Iterable[MediaRef], accepted: tuple[str, ...]) -> None:
    """Raise for the first media part of a modality outside `accepted`; `accepted` lists
    "text" too (as the error shows it), which is never a media part's modality."""
    for ref in refs:
        if ref.modality == "text" or ref.modality not in accepted:
            raise not_accepted(ref.modality, accepted)


def part_kind(part: dict[str, Any], untyped: Iterable[str]) -> str:
    """A content part's declared type; untyped parts (as the templates allow) are named by the
    first key of `untyped` they hold, else they are text."""
    if "type" in part:
        return str(part["type"])
    for key in untyped:
        if key in part:
            return key
    return "text"


# A typed content part -> its template-ready form and, for media, the reference to load.
PartRule = Callable[[dict[str, Any]], tuple[dict[str, Any], MediaRef | None]]


def walk_messages(
    messages: list[dict[str, Any]], rule: PartRule
) -> tuple[list[dict[str, Any]], list[MediaRef]]:
    """Template-ready copies of `messages` and their media parts in prompt order. String (or
    missing) content stays a string; bare string parts are text; every other part goes
    through `rule`."""
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
            templated, ref = rule(part)
            if ref is not None:
                media.append(ref)
            parts.append(templated)
        out.append({**message, "content": parts})
    return out, media
