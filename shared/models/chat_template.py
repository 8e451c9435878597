"""A checkpoint's chat template: where a processor finds it and how it is applied."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def template_file(folder: Path) -> str | None:
    """The processor-level chat template, when the tokenizer files do not carry one."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    as_json = folder / "chat_template.json"
    if as_json.is_file():
        return json.loads(as_json.read_text()).get("chat_template")
    return None


def apply_chat_template(
    tokenizer: Any,
    chat_template: str | None,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool,
    tools: list[dict[str, Any]] | None,
    template_kwargs: dict[str, Any],
) -> str:
    """`messages` (already template-ready) rendered to text by `chat_template`.

    `tools` is passed only when given, so templates see it undefined otherwise; a multimodal
    checkpoint without a template is an error (there is no plain-text fallback for media).
    `template_kwargs` (extra template variables, e.g. enable_thinking) is updated in place.
    """
    if chat_template is None:
        raise ValueError("this checkpoint has no chat template")
    if tools is not None:
        template_kwargs["tools"] = tools
    return tokenizer.apply_chat_template(
        messages,
        chat_template=chat_template,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        **template_kwargs,
    )
