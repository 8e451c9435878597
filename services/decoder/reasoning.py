"""Reasoning ("thinking") models: <think>...</think> blocks, budgets, and splitting the text.

Qwen3-style models write their reasoning between `<think>` and `</think>` tokens, then the
answer. Depending on the chat template the prompt may already end inside the block (templates
that put `<think>\n` in the generation prompt), or the model opens it itself: every piece here
takes the starting state from the prompt's token ids and also follows a `<think>` the model
emits. The markers are ordinary (non-special) tokens in Qwen's tokenizers, so they appear in the
detokenized text, which is what `ReasoningSplitter` works on.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from services.common.flags import env


@dataclass(frozen=True)
class ThinkingTokens:
    start_id: int
    end_id: int
    start: str = "<think>"
    end: str = "</think>"


def thinking_tokens(
    tokenizer: object, start: str = "<think>", end: str = "</think>"
) -> ThinkingTokens | None:
    """The ids of the thinking start/end tokens, or None when the tokenizer lacks either (no
    reasoning parser)."""
    vocab = tokenizer.get_vocab()  # type: ignore[attr-defined]
    start_id, end_id = vocab.get(start), vocab.get(end)
    if start_id is None or end_id is None:
        return None
    return ThinkingTokens(int(start_id), int(end_id), start, end)


def starts_in_thinking(prompt_ids: Sequence[int], tokens: ThinkingTokens) -> bool:
    """Whether the prompt leaves the model inside an open <think> block (its last <think> comes
    after its last </think>); earlier turns' blocks are all closed."""
    last_start = last_end = -1
    for i, t in enumerate(prompt_ids):
        if t == tokens.start_id:
            last_start = i
        elif t == tokens.end_id:
            last_end = i
    return last_start > last_end


@dataclass(frozen=True)
class OutputDefaults:
    """Server-wide defaults (decoder flags); requests override them."""

    enable_thinking: bool | None = None  # None: whatever the chat template does by default
    thinking_budget: int = 0  # 0: unlimited
    reasoning_parser: str = "auto"  # "qwen3", "none", or "auto" (qwen3 if <think> exists)
    thinking_start_token: str = "<think>"
    thinking_end_token: str = "</think>"


def add_flags(p: argparse.ArgumentParser) -> None:
    think = env("PRISM_ENABLE_THINKING")
    p.add_argument(
        "--enable-thinking",
        action=argparse.BooleanOptionalAction,
        default=None if think is None else think.lower() in ("1", "true", "yes"),
        help="default enable_thinking for the chat template (default: the template's own) "
        "[PRISM_ENABLE_THINKING]",
    )
    p.add_argument(
        "--thinking-budget",
        type=int,
        default=int(env("PRISM_THINKING_BUDGET", "0") or 0),
        help="reasoning tokens before </think> is forced; requests may override (0: unlimited) "
        "[PRISM_THINKING_BUDGET]",
    )
    p.add_argument(
        "--reasoning-parser",
        choices=["auto", "qwen3", "none"],
        default=env("PRISM_REASONING_PARSER", "auto"),
        help="split <think>...</think> into reasoning (auto: when the tokenizer has <think>) "
        "[PRISM_REASONING_PARSER]",
    )
    p.add_argument(
        "--thinking-start-token",
        default=env("PRISM_THINKING_START_TOKEN", "<think>"),
        help="the token that opens reasoning [PRISM_THINKING_START_TOKEN]",
    )
    p.add_argument(
        "--thinking-end-token",
        default=env("PRISM_THINKING_END_TOKEN", "</think>"),
        help="the token that closes reasoning (forced when the budget is spent) "
        "[PRISM_THINKING_END_TOKEN]",
    )


def defaults_from_args(args: argparse.Namespace, tokenizer: object) -> OutputDefaults:
    """Checked against the model's tokenizer at start-up (ValueError: a configuration mistake)."""
    if args.thinking_budget < 0:
        raise ValueError("--thinking-budget must be >= 0")
    start, end = args.thinking_start_token, args.thinking_end_token
    if args.reasoning_parser == "qwen3" and thinking_tokens(tokenizer, start, end) is None:
        raise ValueError(f"--reasoning-parser qwen3: the tokenizer has no {start}/{end} tokens")
    return OutputDefaults(
        args.enable_thinking, args.thinking_budget, args.reasoning_parser, start, end
    )


class ThinkingState:
    """Follows the <think> block over the generated token ids."""

    def __init__(self, tokens: ThinkingTokens, in_thinking: bool) -> None:
        self.tokens = tokens
        self.in_thinking = in_thinking
        self.done = False  # the block was closed: no further reasoning
        self.used = 0  # tokens generated inside the block (the end token excluded)
        self.generated = 0

    def accept(self, token: int) -> None:
        self.generated += 1
        if token == self.tokens.end_id and self.in_thinking:
            self.in_thinking, self.done = False, True
        elif token == self.tokens.start_id and not self.done and not self.in_thinking:
            self.in_thinking = True  # the model opened the block itself
        elif self.in_thinking:
            self.used += 1


class ThinkingBudget:
    """TokenConstraint: after `budget` reasoning tokens only the end-of-thinking token is
    allowed, so the model must close the block and answer."""

    def __init__(
        self, tokens: ThinkingTokens, budget: int, vocab_size: int, *, in_thinking: bool
    ) -> None:
        self.state = ThinkingState(tokens, in_thinking)
        self.budget = budget
        self._forced = np.zeros(vocab_size, dtype=bool)
        self._forced[tokens.end_id] = True

    def allowed(self) -> np.ndarray | None:
        s = self.state
        return self._forced if s.in_thinking and s.used >= self.budget else None

    def accept(self, token: int) -> None:
        self.state.accept(token)

    def finished(self) -> bool:
        return False


class AfterThinking:
    """TokenConstraint wrapper: the inner constraint (a grammar) applies to the answer only.

    Unrestricted while thinking. When thinking is expected but the prompt did not open the block
    (`may_open`), the first token may also be <think>, so a grammar does not forbid reasoning."""

    def __init__(self, inner: object, tokens: ThinkingTokens, *, in_thinking: bool, may_open: bool):
        self.inner = inner
        self.state = ThinkingState(tokens, in_thinking)
        self.may_open = may_open and not in_thinking

    def allowed(self) -> np.ndarray | None:
        s = self.state
        if s.in_thinking:
            return None
        mask = self.inner.allowed()  # type: ignore[attr-defined]
        if mask is not None and self.may_open and s.generated == 0:
            mask = mask.copy()
            mask[s.tokens.start_id] = True
        return mask

    def accept(self, token: int) -> None:
        s = self.state
        answering = not s.in_thinking and not (self.may_open and s.generated == 0 and
                                               token == s.tokens.start_id)  # fmt: skip
        s.accept(token)
        if answering:
            self.inner.accept(token)  # type: ignore[attr-defined]

    def finished(self) -> bool:
        return not self.state.in_thinking and self.inner.finished()  # type: ignore[attr-defined]


class ReasoningSplitter:
    """Streaming text -> (reasoning, content): text inside <think>...</think> is reasoning.

    A tag split across pieces is held back until complete. The newlines the template writes
    around the block ("<think>\\n...\\n</think>\\n\\n") are trimmed from both sides."""

    def __init__(self, tokens: ThinkingTokens, *, in_thinking: bool) -> None:
        self.start, self.end = tokens.start, tokens.end
        self.in_thinking = in_thinking
        self.done = False  # after </think> nothing is reasoning any more
        self._held = ""  # a possible partial tag, or reasoning's trailing newlines
        self._at_start = True  # of the current section: drop its leading newlines

    def feed(self, text: str) -> tuple[str, str]:
        out: tuple[list[str], list[str]] = ([], [])
        buf, self._held = self._held + text, ""
        while buf:
            tag = self.end if self.in_thinking else None if self.done else self.start
            i = buf.find(tag) if tag else -1
            if tag is not None and i >= 0:
                self._emit(buf[:i].rstrip("\n") if self.in_thinking else buf[:i], out)
                self.done = self.done or tag == self.end
                self.in_thinking = tag == self.start
                self._at_start, buf = True, buf[i + len(tag) :]
                continue
            keep = _partial_suffix(buf, tag) if tag else 0
            if self.in_thinking:  # "\n" just before </think> is not reasoning: hold it too
                keep = len(buf) - len(buf[: len(buf) - keep].rstrip("\n"))
            self._emit(buf[: len(buf) - keep], out)
            self._held = buf[len(buf) - keep :]
            break
        return "".join(out[0]), "".join(out[1])

    def flush(self) -> tuple[str, str]:
        out: tuple[list[str], list[str]] = ([], [])
        self._emit(self._held, out)
        self._held = ""
        return "".join(out[0]), "".join(out[1])

    def _emit(self, text: str, out: tuple[list[str], list[str]]) -> None:
        if self._at_start:
            text = text.lstrip("\n")
            self._at_start = not text
        out[0 if self.in_thinking else 1].append(text)


def _partial_suffix(buf: str, tag: str) -> int:
    """Length of the longest suffix of `buf` that is a proper prefix of `tag`."""
    for k in range(min(len(tag) - 1, len(buf)), 0, -1):
        if buf.endswith(tag[:k]):
            return k
    return 0
