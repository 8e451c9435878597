"""The part of a processor that is the same for every family: ``render`` and ``__call__``
(chat messages -> template text -> ``ProcessedPrompt``), built on the per-family steps that a
subclass supplies (`load_media`, `build_prompt`; `normalise` for another message form,
`apply_template` to change how the template is applied)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from shared.media.types import MediaInput, ProcessedPrompt
from shared.models.chat_messages import MediaRef, refuse_unaccepted
from shared.models.chat_template import apply_chat_template
from shared.models.qwen2_vl.messages import normalise_messages


def special_token_id(tokenizer: Any, token: str, checkpoint: str) -> int:
    """`token`'s id; a tokenizer without it (unknown or None) is from another `checkpoint`
    kind, so fail at load rather than expand placeholders that never match."""
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"tokenizer has no {token} token; is this {checkpoint}?")
    return int(token_id)


# (slot, its token id, the media item there) -> how many tokens that placeholder becomes;
# raises ValueError when the placeholder does not suit the item.
SlotTokens = Callable[[int, int, MediaInput], int]


def expand_placeholders(
    input_ids: Sequence[int],
    media: Sequence[MediaInput],
    placeholder_ids: Sequence[int],
    tokens: SlotTokens,
    *,
    placeholders: str,
    items: str,
) -> list[int]:
    """Token ids with the i-th placeholder (any of `placeholder_ids`) repeated to media item
    i's token count, as `tokens` gives it. One placeholder per item, exactly: anything else is
    a prompt the media cannot be matched to. `placeholders` / `items` name both in the error."""
    ids = np.asarray(input_ids, dtype=np.int64)
    slots = np.flatnonzero(np.isin(ids, list(placeholder_ids)))
    if len(slots) != len(media):
        raise ValueError(
            f"prompt has {len(slots)} {placeholders} placeholders, got {len(media)} {items}"
        )
    repeats = np.ones(len(ids), dtype=np.int64)
    for slot, item in zip(slots.tolist(), media, strict=True):
        repeats[slot] = tokens(slot, int(ids[slot]), item)
    return np.repeat(ids, repeats).tolist()


def replace_markers(
    text: str, marker: str, media: Sequence[MediaInput], expand: Callable[[MediaInput], str]
) -> str:
    """`text` with its i-th `marker` (as the chat template wrote it, one per image) replaced by
    `expand(media[i])`, for families that expand in the text before tokenizing it whole (so
    the expansion merges with its neighbours exactly as in transformers)."""
    pieces = text.split(marker)
    if len(pieces) - 1 != len(media):
        found = len(pieces) - 1
        raise ValueError(f"prompt has {found} {marker} placeholders, got {len(media)} images")
    out = [pieces[0]]
    for item, piece in zip(media, pieces[1:], strict=True):
        out += [expand(item), piece]
    return "".join(out)


class ChatProcessor:
    """Base of the multimodal processors (TextProcessor is not one: see there)."""

    modalities: tuple[str, ...]

    def __init__(self, tokenizer: Any, chat_template: str | None) -> None:
        self.tokenizer = tokenizer
        # The checkpoint's processor-level template file wins over the tokenizer's own.
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)

    def normalise(
        self, messages: list[dict[str, Any]]
    ) -> tuple[list[dict[str, Any]], list[MediaRef]]:
        """Template-ready messages and their media parts in prompt order; raises
        `MediaNotSupportedError` for a modality this model does not take.

        By default the image / video part form every vision family reads (Qwen-VL's), with
        the media outside `modalities` (e.g. video for an image-only model) refused."""
        normalised, refs = normalise_messages(messages)
        refuse_unaccepted(refs, self.modalities)
        return normalised, refs

    def load_media(self, ref: MediaRef) -> MediaInput:
        raise NotImplementedError

    def build_prompt(self, text: str, media: list[MediaInput]) -> ProcessedPrompt:
        """Rendered text and its loaded media -> token ids with every placeholder expanded."""
        raise NotImplementedError

    def apply_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool,
        tools: list[dict[str, Any]] | None,
        template_kwargs: dict[str, Any],
    ) -> str:
        return apply_chat_template(
            self.tokenizer,
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            template_kwargs=template_kwargs,
        )

    def render(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **template_kwargs: Any,
    ) -> str:
        """template_kwargs: extra template variables (e.g. enable_thinking for Qwen3)."""
        normalised, _ = self.normalise(messages)
        return self.apply_template(normalised, add_generation_prompt, tools, template_kwargs)

    def __call__(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **template_kwargs: Any,
    ) -> ProcessedPrompt:
        normalised, refs = self.normalise(messages)
        text = self.apply_template(normalised, add_generation_prompt, tools, template_kwargs)
        # Media load only once the messages are known to render.
        return self.build_prompt(text, [self.load_media(ref) for ref in refs])
