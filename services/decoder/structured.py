"""A request's output options -> the engine's token constraints and the output post-processing.

Built per request in the servicer (off the event loop, with the prompt): the constraints go into
`EngineRequest.constraints` (grammar masks, the thinking budget), and an `OutputProcessor`
rewrites the engine's deltas: text inside <think>...</think> becomes `reasoning_text`, Qwen
`<tool_call>` blocks become `tool_calls`, and a finish after tool calls is TOOL_CALLS.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from prism.v1 import decoder_pb2

from services.decoder import grammar, tools
from services.decoder.reasoning import (
    AfterThinking,
    OutputDefaults,
    ReasoningSplitter,
    ThinkingBudget,
    ThinkingState,
    ThinkingTokens,
    starts_in_thinking,
    thinking_tokens,
)
from shared.errors import InvalidRequestError
from shared.loading.config import text_config
from shared.runtime.loaded import LoadedModel

_FORMAT = decoder_pb2.ResponseFormat


def template_kwargs(request: decoder_pb2.GenerateRequest, defaults: OutputDefaults) -> dict:
    """Chat-template variables: the request's chat_template_kwargs, with enable_thinking from
    OutputOptions (when set) or else the server default (when the request did not set it)."""
    extra: dict[str, Any] = {}
    raw = request.messages.chat_template_kwargs_json if request.HasField("messages") else ""
    if raw:
        try:
            extra = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise InvalidRequestError(
                f"chat_template_kwargs is not valid JSON: {exc}", param="chat_template_kwargs"
            ) from exc
        if not isinstance(extra, dict):
            raise InvalidRequestError(
                "chat_template_kwargs must be a JSON object", param="chat_template_kwargs"
            )
    if request.output.HasField("enable_thinking"):
        extra["enable_thinking"] = request.output.enable_thinking
    elif "enable_thinking" not in extra and defaults.enable_thinking is not None:
        extra["enable_thinking"] = defaults.enable_thinking
    return extra


@dataclass
class OutputPlan:
    constraints: list[Any] = field(default_factory=list)
    think: ThinkingTokens | None = None  # the model's <think> markers (reasoning parser on)
    in_thinking: bool = False  # the prompt leaves the model inside <think>
    split_reasoning: bool = False  # reasoning text goes to reasoning_text, not text
    parse_tools: bool = False


def plan_output(
    model: LoadedModel,
    request: decoder_pb2.GenerateRequest,
    prompt_ids: list[int],
    defaults: OutputDefaults,
    enable_thinking: bool | None,
) -> OutputPlan:
    """Validate the output options and build the constraints (InvalidRequestError if bad)."""
    out, plan = request.output, OutputPlan()
    tok = model.tokenizer
    think = _reasoning_markers(model, defaults)
    in_thinking = think is not None and starts_in_thinking(prompt_ids, think)
    # May the model open <think> itself? Not when thinking is off, nor when the template
    # already closed an empty block at the end of the prompt (Qwen3, enable_thinking=False).
    closed = think is not None and think.end_id in prompt_ids[-3:]
    may_open = think is not None and enable_thinking is not False and not closed
    vocab = max(int(text_config(model.config)["vocab_size"]), len(tok))
    plan.think, plan.in_thinking = think, in_thinking
    plan.split_reasoning = think is not None and out.parse_reasoning
    budget = out.thinking_budget or defaults.thinking_budget
    if think is not None and budget and (in_thinking or may_open):
        plan.constraints.append(ThinkingBudget(think, budget, vocab, in_thinking=in_thinking))
    tool_list = _tools(request)
    choice = (out.tool_choice or "auto") if tool_list else "none"
    if out.tool_choice not in ("", "auto", "none") and not tool_list:
        raise InvalidRequestError(
            f"tool_choice {out.tool_choice!r} needs tools", param="tool_choice"
        )
    plan.parse_tools = choice != "none"
    g = _grammar(model, out, tool_list, choice, vocab)
    if g is not None:
        if think is not None and (in_thinking or may_open):  # constrain the answer only
            g = AfterThinking(g, think, in_thinking=in_thinking, may_open=may_open)
        plan.constraints.append(g)
    return plan


def _reasoning_markers(model: LoadedModel, defaults: OutputDefaults) -> ThinkingTokens | None:
    """The thinking markers when reasoning is parsed: always with "qwen3"; with "auto" only when
    the chat template writes the start marker too (Qwen2.5's tokenizer has <think> but never
    thinks)."""
    parser = defaults.reasoning_parser
    if parser == "none":
        return None
    think = thinking_tokens(
        model.tokenizer, defaults.thinking_start_token, defaults.thinking_end_token
    )
    if parser == "auto":
        template = getattr(model.processor, "chat_template", None) or getattr(
            model.tokenizer, "chat_template", None
        )
        if not isinstance(template, str) or think is None or think.start not in template:
            return None
    return think


def _tools(request: decoder_pb2.GenerateRequest) -> list[dict[str, Any]]:
    raw = request.messages.tools_json if request.HasField("messages") else ""
    if not raw:
        return []
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(f"tools is not valid JSON: {exc}", param="tools") from exc
    if not isinstance(value, list):
        raise InvalidRequestError("tools must be a JSON list", param="tools")
    return value


def _grammar(
    model: LoadedModel,
    out: decoder_pb2.OutputOptions,
    tool_list: list[dict[str, Any]],
    choice: str,
    vocab: int,
) -> grammar.GrammarConstraint | None:
    fmt = out.response_format
    forced = choice not in ("auto", "none")
    if not forced and fmt.type == _FORMAT.TYPE_TEXT:
        return None
    llt = grammar.llg_tokenizer(model.tokenizer, vocab, model.eos_token_ids)
    if forced:  # a forced call wins over response_format: the answer *is* the call
        ids = model.tokenizer.get_vocab()
        if tools.START not in ids or tools.END not in ids:
            raise InvalidRequestError(
                "this model's tokenizer has no <tool_call> tokens: tool_choice cannot be forced",
                param="tool_choice",
            )
        text = tools.tool_call_grammar(
            tool_list, choice, ids[tools.START], ids[tools.END], json_options=grammar.JSON_OPTIONS
        )
        return grammar.GrammarConstraint(llt, grammar.lark_grammar(text), param="tool_choice")
    if fmt.type == _FORMAT.TYPE_JSON_OBJECT:
        return grammar.GrammarConstraint(llt, grammar.json_object_grammar())
    if not fmt.json_schema:
        raise InvalidRequestError("json_schema needs a schema", param="response_format")
    return grammar.GrammarConstraint(
        llt, grammar.json_schema_grammar(fmt.json_schema, strict=fmt.strict)
    )


class OutputProcessor:
    """Rewrites the engine's GenerateResponse stream (already protos) for reasoning and tools."""

    def __init__(self, plan: OutputPlan) -> None:
        think, split = plan.think, plan.split_reasoning
        self.splitter = (
            ReasoningSplitter(think, in_thinking=plan.in_thinking) if think and split else None
        )
        self.parser = tools.ToolCallParser() if plan.parse_tools else None
        # Counts reasoning tokens for usage whether or not the text is split.
        self.state = ThinkingState(think, plan.in_thinking) if think else None

    def process(self, ev: decoder_pb2.GenerateResponse) -> list[decoder_pb2.GenerateResponse]:
        if ev.HasField("delta"):
            d = ev.delta
            if self.state is not None:
                for t in d.token_ids:
                    self.state.accept(t)
            self._rewrite(d, *self._split(d.text, final=False))
            return [ev]
        out = []
        reasoning, content, calls = self._split("", final=True)
        if reasoning or content or calls:
            tail = decoder_pb2.GenerateResponse(delta=decoder_pb2.Delta(index=ev.finish.index))
            self._rewrite(tail.delta, reasoning, content, calls)
            out.append(tail)
        f = ev.finish
        if (
            self.parser is not None
            and self.parser.calls
            and f.reason == decoder_pb2.FINISH_REASON_STOP
        ):
            f.reason = decoder_pb2.FINISH_REASON_TOOL_CALLS
        if self.state is not None:
            f.usage.reasoning_tokens = self.state.used
        return [*out, ev]

    def _split(self, text: str, *, final: bool) -> tuple[str, str, list[tools.ToolCall]]:
        reasoning, content = "", text
        if self.splitter is not None:
            reasoning, content = self.splitter.flush() if final else self.splitter.feed(text)
        calls: list[tools.ToolCall] = []
        if self.parser is not None:
            content, calls = self.parser.feed(content)
            if final:
                rest, more = self.parser.flush()
                content, calls = content + rest, calls + more
        return reasoning, content, calls

    @staticmethod
    def _rewrite(
        d: decoder_pb2.Delta, reasoning: str, content: str, calls: list[tools.ToolCall]
    ) -> None:
        d.text, d.reasoning_text = content, reasoning
        del d.tool_calls[:]
        d.tool_calls.extend(
            decoder_pb2.ToolCall(id=c.id, name=c.name, arguments=c.arguments)
            for c in tools.coalesce(calls)
        )
