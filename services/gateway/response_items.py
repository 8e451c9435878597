"""Responses API output: the response object and its items (message, reasoning, function calls).

Shared by the non-streaming answer and the stream's final events, so both list the same items
in the same order with the same ids.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from prism.v1 import common_pb2, decoder_pb2

from services.gateway.chat import ToolCallIndex
from services.gateway.generation import Collected
from services.gateway.schemas import ResponsesRequest


def lp_json(lp: decoder_pb2.TokenLogprob, with_bytes: bool) -> dict[str, Any]:
    def one(token: str, logprob: float, raw: bytes) -> dict[str, Any]:
        out: dict[str, Any] = {"token": token, "logprob": logprob}
        if with_bytes:
            out["bytes"] = list(raw or token.encode("utf-8", "replace"))
        return out

    top = [one(t.token, t.logprob, t.bytes) for t in lp.top_logprobs]
    return {**one(lp.token, lp.logprob, lp.bytes), "top_logprobs": top}


def function_tool(tool: dict[str, Any]) -> dict[str, Any]:
    """A request's function tool (chat's nested shape or the Responses API's flat one) as the
    Responses API echoes it: type, name, description, parameters, strict."""
    if tool.get("type", "function") != "function":
        return tool
    fn = tool.get("function") if isinstance(tool.get("function"), dict) else tool
    return {
        "type": "function",
        "name": fn.get("name"),
        "description": fn.get("description"),
        "parameters": fn.get("parameters"),
        "strict": fn.get("strict"),
    }


class ResponseBuilder:
    def __init__(self, body: ResponsesRequest, response_id: str, logprobs: bool) -> None:
        self.body, self.id, self.logprobs = body, response_id, logprobs
        self.created = int(time.time())
        self.msg_id = f"msg_{uuid.uuid4().hex}"
        self.rs_id = f"rs_{uuid.uuid4().hex}"
        self.reasoning_first = True  # streaming clears it when the answer came first
        self.message_streamed = False  # a streamed message item must appear in the output

    def response(
        self,
        status: str,
        output: list[dict[str, Any]],
        usage: common_pb2.Usage | None = None,
        error: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        b = self.body
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "completed_at": int(time.time()) if status == "completed" else None,
            "model": b.model,
            "output": output,
            "error": error,
            "incomplete_details": {"reason": "max_output_tokens"}
            if status == "incomplete"
            else None,
            "instructions": b.instructions,
            "max_output_tokens": b.max_output_tokens,
            "metadata": b.metadata or {},
            "parallel_tool_calls": b.parallel_tool_calls,
            "previous_response_id": None,
            "temperature": b.temperature,
            "top_p": b.top_p,
            "top_logprobs": b.top_logprobs,
            "tool_choice": b.tool_choice or "auto",
            "tools": [function_tool(t) for t in b.tools or []],
            "text": b.text or {"format": {"type": "text"}},
            "truncation": "disabled",
        } | ({"usage": self.usage(usage)} if usage is not None else {})

    @staticmethod
    def usage(u: common_pb2.Usage) -> dict[str, Any]:
        return {
            "input_tokens": u.prompt_tokens,
            "input_tokens_details": {
                "cached_tokens": u.cached_prompt_tokens,
                "cache_write_tokens": 0,
            },
            "output_tokens": u.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
            "total_tokens": u.prompt_tokens + u.completion_tokens,
        }

    def text_part(self, text: str, logprobs: list[decoder_pb2.TokenLogprob]) -> dict[str, Any]:
        lps = [lp_json(lp, True) for lp in logprobs] if self.logprobs else []
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": lps}

    def message(self, status: str, content: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "type": "message",
            "id": self.msg_id,
            "status": status,
            "role": "assistant",
            "content": content,
        }

    def reasoning_item(self, status: str, text: str | None) -> dict[str, Any]:
        content = [] if text is None else [{"type": "reasoning_text", "text": text}]
        return {"type": "reasoning", "id": self.rs_id, "summary": [], "content": content,
                "status": status}  # fmt: skip

    def final(self, result: Collected) -> dict[str, Any]:
        """Reasoning (if any) first, as it came first; then the message (left out when the
        answer is only tool calls); then one function_call item per call."""
        finish = result.finish or decoder_pb2.Finish()
        status = "incomplete" if finish.reason == decoder_pb2.FINISH_REASON_LENGTH else "completed"
        text, reasoning = "".join(result.text), "".join(result.reasoning)
        tools = ToolCallIndex()
        for tc in result.tool_calls:
            tools.add(tc)
        output = []
        if text or not tools.calls or self.message_streamed:
            output.append(self.message(status, [self.text_part(text, result.logprobs)]))
        if reasoning:
            output.insert(0 if self.reasoning_first else len(output),
                          self.reasoning_item("completed", reasoning))  # fmt: skip
        for call in tools.calls.values():
            output.append(
                {
                    "type": "function_call",
                    "id": f"fc_{uuid.uuid4().hex}",
                    "call_id": call["id"],
                    "name": call["function"]["name"],
                    "arguments": call["function"]["arguments"],
                    "status": "completed",
                }
            )
        return self.response(status, output, finish.usage)
