"""Tool calls in Qwen's (Hermes-style) syntax: parsing the stream, and forcing calls by grammar.

The model writes each call as
    <tool_call>\\n{"name": "get_weather", "arguments": {"city": "Paris"}}\\n</tool_call>
(the chat templates of Qwen2.5 and Qwen3 teach exactly this). `ToolCallParser` turns streamed
text into content and `ToolCall` deltas: the name as soon as it is known, then the arguments
piece by piece, as OpenAI streams them. `tool_call_grammar` builds the llguidance grammar that
enforces tool_choice="required" or a named function.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from shared.errors import InvalidRequestError

START, END = "<tool_call>", "</tool_call>"
# The call's head when written in the template's order; then the arguments object follows.
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*(?=\{)')


@dataclass(frozen=True)
class ToolCall:
    """One streamed piece: the first piece of a call has its name; later ones add arguments."""

    id: str
    name: str = ""
    arguments: str = ""


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolCallParser:
    def __init__(self) -> None:
        self.calls = 0  # completed or started
        self._buf = ""  # text not yet classified
        self._in_call = False
        self._call_id = ""  # set once the current call's name went out
        self._sent = 0  # characters of the current call's arguments already streamed
        self._ws = ""  # whitespace content held back: dropped if only calls surround it

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        """A piece of model text -> (content text, tool-call pieces)."""
        self._buf += text
        content: list[str] = []
        calls: list[ToolCall] = []
        while True:
            if not self._in_call:
                i = self._buf.find(START)
                if i < 0:
                    keep = _partial_suffix(self._buf, START)
                    self._content(self._buf[: len(self._buf) - keep], content)
                    self._buf = self._buf[len(self._buf) - keep :]
                    break
                self._content(self._buf[:i], content)
                self._ws = ""  # whitespace right before a call is layout, not content
                self._buf, self._in_call = self._buf[i + len(START) :], True
                continue
            j = self._buf.find(END)
            if j < 0:
                calls.extend(self._stream_arguments(self._buf))
                break
            calls.extend(self._finish_call(self._buf[:j], content, closed=True))
            self._buf, self._in_call = self._buf[j + len(END) :], False
        return "".join(content), calls

    def flush(self) -> tuple[str, list[ToolCall]]:
        """Generation ended: a call left open (no </tool_call>) still counts if it parses."""
        content: list[str] = []
        calls: list[ToolCall] = []
        if self._in_call:
            calls.extend(self._finish_call(self._buf, content, closed=False))
        else:
            self._content(self._buf, content)
        self._buf, self._in_call = "", False
        if not self.calls:
            content.append(self._ws)
        self._ws = ""
        return "".join(content), calls

    def _content(self, text: str, out: list[str]) -> None:
        if not text:
            return
        if not self.calls:  # before any call, content streams at once (trailing ws held)
            body = text.rstrip()
            if body:
                out.append(self._ws + body)
                self._ws = ""
            self._ws += text[len(body) :]
            return
        # After a call: whitespace between calls is layout; real text is content.
        self._ws += text
        if self._ws.strip():
            out.append(self._ws.lstrip())
            self._ws = ""

    def _stream_arguments(self, body: str) -> list[ToolCall]:
        """While a call is open: announce it once its name is known, then stream its arguments,
        holding back the tail that may be the wrapper's closing brace."""
        head = _HEAD.match(body)
        if head is None:
            return []
        out = []
        if not self._call_id:
            self._call_id = new_call_id()
            self.calls += 1
            out.append(ToolCall(self._call_id, name=json.loads(f'"{head.group(1)}"')))
        args = body[head.end() :]
        args = args[: len(args) - _partial_suffix(args, END)]  # "</tool_c" is no argument
        safe = len(args.rstrip().rstrip("}").rstrip())  # any run of "}" may end the wrapper
        if safe > self._sent:
            out.append(ToolCall(self._call_id, arguments=args[self._sent : safe]))
            self._sent = safe
        return out

    def _finish_call(self, body: str, content: list[str], *, closed: bool) -> list[ToolCall]:
        out = self._stream_arguments(body)
        call_id, sent = self._call_id, self._sent
        self._call_id, self._sent = "", 0
        try:
            parsed = json.loads(body)
            name, args = parsed["name"], parsed.get("arguments", {})
            if not isinstance(name, str):
                raise TypeError("name")
        except (ValueError, KeyError, TypeError):
            if not call_id:  # never announced: give the text back as content, as vLLM does
                self._content(START + body + (END if closed else ""), content)
                return out
            head = _HEAD.match(body)  # announced: send what is left of the raw arguments
            rest = body[head.end() :].rstrip().removesuffix("}").rstrip() if head else ""
            return [*out, ToolCall(call_id, arguments=rest[sent:])] if rest[sent:] else out
        if not call_id:  # not in the template's key order: the whole call at once
            self.calls += 1
            arguments = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
            return [*out, ToolCall(new_call_id(), name=name, arguments=arguments)]
        raw = body[_HEAD.match(body).end() :].rstrip()  # type: ignore[union-attr]
        raw = raw.removesuffix("}").rstrip()  # the wrapper's brace; the rest is the arguments
        return [*out, ToolCall(call_id, arguments=raw[sent:])] if raw[sent:] else out


def _partial_suffix(buf: str, tag: str) -> int:
    for k in range(min(len(tag) - 1, len(buf)), 0, -1):
        if buf.endswith(tag[:k]):
            return k
    return 0


def coalesce(pieces: list[ToolCall]) -> list[ToolCall]:
    """Adjacent pieces of one call as one (a delta then carries a call's name and its first
    arguments together, as OpenAI streams them)."""
    out: list[ToolCall] = []
    for p in pieces:
        if out and out[-1].id == p.id:
            last = out[-1]
            out[-1] = ToolCall(p.id, last.name + p.name, last.arguments + p.arguments)
        else:
            out.append(p)
    return out


def merge_calls(pieces: list[ToolCall]) -> list[dict[str, str]]:
    """Pieces -> whole calls [{"id", "name", "arguments"}] (tests, non-streaming callers)."""
    calls: dict[str, dict[str, str]] = {}
    for p in pieces:
        call = calls.setdefault(p.id, {"id": p.id, "name": "", "arguments": ""})
        call["name"] += p.name
        call["arguments"] += p.arguments
    return list(calls.values())


def tool_schemas(tools: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Function name -> its parameters schema, from OpenAI-shaped tools."""
    out = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise InvalidRequestError(f"tools[{i}] needs a function name", param="tools")
        params = fn.get("parameters") or {"type": "object"}
        if not isinstance(params, dict):
            raise InvalidRequestError(f"tools[{i}].parameters must be an object", param="tools")
        out[fn["name"]] = params
    return out


def tool_call_grammar(
    tools: list[dict[str, Any]],
    choice: str,
    start_id: int,
    end_id: int,
    *,
    allow_text: bool = False,
    json_options: dict[str, Any] | None = None,
) -> str:
    """Lark (llguidance dialect) for one or more calls in Qwen's syntax.

    choice: "required" (any of the tools) or a function name (only that one). The call markers
    are matched as the tokenizer's tokens (`<[id]>`), as the model emits them. allow_text lets
    free text precede the calls (for "auto"-like use; "required" and named calls start with one)."""
    schemas = tool_schemas(tools)
    if choice != "required":
        if choice not in schemas:
            raise InvalidRequestError(
                f"tool_choice names {choice!r}, which is not among the tools", param="tool_choice"
            )
        schemas = {choice: schemas[choice]}
    if not schemas:
        raise InvalidRequestError("tool_choice requires tools", param="tool_choice")
    opts = json_options or {}
    bodies = []
    for name, params in schemas.items():
        body = {
            "type": "object",
            "properties": {"name": {"const": name}, "arguments": params},
            "required": ["name", "arguments"],
            "additionalProperties": False,
            "x-guidance": opts,
        }
        bodies.append(f"%json {json.dumps(body)}")
    lines = [
        "start: TEXT? calls" if allow_text else "start: calls",
        "calls: call+" if choice == "required" else "calls: call",  # a named function: once
        f'call: <[{start_id}]> "\\n" body "\\n" <[{end_id}]> "\\n"?',
        "body: " + " | ".join(bodies),
    ]
    if allow_text:
        lines.append("TEXT: /(.|\\n)+/")
    return "\n".join(lines) + "\n"
