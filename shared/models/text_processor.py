"""Chat messages -> token ids for text-only models, through the tokenizer's chat template."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shared.media.types import ProcessedPrompt
from shared.models.chat_messages import not_accepted


def message_text(content: str | list[dict[str, Any]] | None, allowed: tuple[str, ...]) -> str:
    """Flatten OpenAI-style content parts to text, refusing modalities the model lacks."""
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for part in content:
        kind = part.get("type", "text")
        if kind == "text":
            texts.append(part.get("text", ""))
        else:
            raise not_accepted(kind.removesuffix("_url"), allowed)
    return "".join(texts)


class TextProcessor:
    """Not a `ChatProcessor`: it uses the tokenizer's own template (which may pick a tool-use
    variant), falls back to plain text without one, and has no `build_prompt` (the decoder
    tells text models by that)."""

    modalities = ("text",)

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(cls, path: Path, config: dict[str, Any] | None = None) -> TextProcessor:
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(str(path)))

    def render(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **template_kwargs: Any,
    ) -> str:
        """template_kwargs: extra template variables (e.g. enable_thinking for Qwen3)."""
        flat = [{**m, "content": message_text(m.get("content"), self.modalities)} for m in messages]
        if self.tokenizer.chat_template is None:
            # Base models without a template: the conversation is the plain concatenation.
            return "".join(m["content"] for m in flat)
        return self.tokenizer.apply_chat_template(
            flat,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            **template_kwargs,
        )

    def __call__(self, messages: list[dict[str, Any]], **kwargs: Any) -> ProcessedPrompt:
        text = self.render(messages, **kwargs)
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return ProcessedPrompt(input_ids=list(ids))
