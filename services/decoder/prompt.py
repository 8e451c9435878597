"""GenerateRequest prompt + fetched features -> ProcessedPrompt and the feature list.

Media parts are rendered as the template's own image/video parts (the template only needs the
type), then each placeholder is expanded to the item's token count. The MediaInputs carry no
pixels: only the grid and seconds_per_grid that M-RoPE positions need; the features come from
the cache.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from prism.v1 import common_pb2, decoder_pb2

from services.common.models import modality_name
from services.decoder.apc.hashing import media_spans
from services.decoder.apc.prefix import PrefixCache
from shared.errors import InvalidRequestError
from shared.media.types import MediaInput, ProcessedPrompt
from shared.models.base import MediaFeatures
from shared.runtime.loaded import LoadedModel

_NO_PIXELS = np.zeros((0, 0), dtype=np.float32)
# Processor attributes holding media placeholder token ids (those the processor has).
_PAD_ATTRS = ("image_token_id", "video_token_id", "audio_token_id")


def media_refs(request: decoder_pb2.GenerateRequest) -> list[common_pb2.MediaFeatureRef]:
    """The request's media in prompt order."""
    if request.HasField("tokens"):
        return list(request.tokens.media)
    return [p.media for m in request.messages.messages for p in m.content if p.HasField("media")]


def check_modalities(
    model: LoadedModel, model_id: str, refs: list[common_pb2.MediaFeatureRef]
) -> None:
    accepted = model.family.modalities
    for ref in refs:
        name = modality_name(ref.modality)
        if name == "text" or name not in accepted:
            raise InvalidRequestError(
                f"model {model_id!r} does not accept {name} input; it accepts: "
                + ", ".join(accepted)
            )


def build_prompt(
    model: LoadedModel,
    request: decoder_pb2.GenerateRequest,
    features: dict[str, MediaFeatures],
    template_kwargs: dict[str, Any] | None = None,
) -> tuple[ProcessedPrompt, list[MediaFeatures]]:
    """template_kwargs: chat-template variables (default: the request's chat_template_kwargs)."""
    refs = media_refs(request)
    media = [_media_input(ref, features, getattr(model.processor, "merge_size", 2)) for ref in refs]
    feats = [features[ref.content_key] for ref in refs]
    if request.HasField("tokens"):
        ids = list(request.tokens.token_ids)
        _check_placeholders(model, ids, refs)
        return ProcessedPrompt(input_ids=ids, media=media), feats
    if not request.HasField("messages"):
        raise InvalidRequestError("the request has no prompt (messages or tokens)")
    if template_kwargs is None:
        template_kwargs = _json(
            request.messages.chat_template_kwargs_json, "chat_template_kwargs", dict
        )
    # tool_choice "none": the model is not told about the tools, so it answers in text.
    tools_off = request.output.tool_choice == "none"
    text = render(model, request.messages, template_kwargs, tools_off=tools_off)
    build = getattr(model.processor, "build_prompt", None)
    try:
        if build is not None:
            return build(text, media), feats
        if media:
            raise InvalidRequestError("this model takes no media")
        return ProcessedPrompt(model.tokenizer.encode(text, add_special_tokens=False)), feats
    except ValueError as exc:  # e.g. placeholder count != media count
        raise InvalidRequestError(str(exc)) from exc


def render(
    model: LoadedModel,
    messages: decoder_pb2.Messages,
    template_kwargs: dict[str, Any] | None = None,
    *,
    tools_off: bool = False,
) -> str:
    if not messages.messages:
        raise InvalidRequestError("messages must not be empty", param="messages")
    chat = [_message_dict(m) for m in messages.messages]
    tools = _json(messages.tools_json, "tools", list) if messages.tools_json else None
    extra = dict(template_kwargs or {})
    for reserved in ("messages", "tools", "add_generation_prompt", "tokenize", "chat_template"):
        if reserved in extra:  # would clash with the arguments render passes itself
            raise InvalidRequestError(
                f"chat_template_kwargs may not set {reserved!r}", param="chat_template_kwargs"
            )
    processor, add = model.processor, messages.add_generation_prompt
    try:
        return processor.render(
            chat, add_generation_prompt=add, tools=None if tools_off else tools or None, **extra
        )
    except Exception as exc:  # noqa: BLE001 - template errors are the request's fault
        raise InvalidRequestError(f"could not apply the chat template: {exc}") from exc


def _message_dict(message: decoder_pb2.ChatMessage) -> dict[str, Any]:
    parts: list[dict[str, Any]] = []
    for part in message.content:
        if part.HasField("media"):
            name = modality_name(part.media.modality)
            parts.append({"type": name, name: part.media.content_key})  # never loaded
        else:
            parts.append({"type": "text", "text": part.text})
    text_only = all(p["type"] == "text" for p in parts)
    out: dict[str, Any] = {
        "role": message.role,
        "content": "".join(p["text"] for p in parts) if text_only else parts,
    }
    if message.name:
        out["name"] = message.name
    if message.tool_call_id:
        out["tool_call_id"] = message.tool_call_id
    if message.tool_calls_json:
        out["tool_calls"] = [
            _tool_call(c) for c in _json(message.tool_calls_json, "tool_calls", list)
        ]
    if message.reasoning_content:
        out["reasoning_content"] = message.reasoning_content
    return out


def _tool_call(call: Any) -> Any:
    """OpenAI sends arguments as JSON text; templates (Qwen2.5's `| tojson`) expect the object,
    so parse it, as vLLM does. Text that is not JSON is left as it is."""
    fn = call.get("function") if isinstance(call, dict) else None
    if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
        try:
            fn = {**fn, "arguments": json.loads(fn["arguments"])}
        except json.JSONDecodeError:
            return call
        return {**call, "function": fn}
    return call


def _media_input(
    ref: common_pb2.MediaFeatureRef, features: dict[str, MediaFeatures], merge: int
) -> MediaInput:
    grid = tuple(int(g) for g in ref.grid)
    name = modality_name(ref.modality)
    if name == "audio":
        item = _audio_input(ref, grid)
    elif len(grid) not in (3, 5) or min(grid[:3]) <= 0:  # 5: SmolVLM's (t, h, w, rows, cols)
        raise InvalidRequestError(f"media {ref.content_key}: grid must be (t, h, w), got {grid}")
    else:
        spg = (ref.seconds_per_grid or None) if name == "video" else None
        item = MediaInput(name, _NO_PIXELS, grid, seconds_per_grid=spg)  # type: ignore[arg-type]
    rows = {n: t.shape[0] for n, t in features[ref.content_key].tensors().items()}
    if not item.num_tokens(merge) == ref.num_tokens == rows["features"]:
        raise InvalidRequestError(
            f"media {ref.content_key}: grid {grid} gives {item.num_tokens(merge)} tokens, the "
            f"ref says {ref.num_tokens} and the cached features have {rows['features']} rows"
        )
    if len(set(rows.values())) != 1:
        raise InvalidRequestError(f"media {ref.content_key}: cached tensors differ in rows {rows}")
    return item


def _audio_input(ref: common_pb2.MediaFeatureRef, grid: tuple[int, ...]) -> MediaInput:
    """Audio refs carry (mel frames,); how many tokens that makes is the model's rule, so the
    ref's count is taken and checked against the cached rows."""
    if len(grid) != 1 or grid[0] <= 0:
        raise InvalidRequestError(f"media {ref.content_key}: audio grid must be (frames,): {grid}")
    return MediaInput("audio", _NO_PIXELS, grid, tokens=int(ref.num_tokens))


def _check_placeholders(
    model: LoadedModel, ids: list[int], refs: list[common_pb2.MediaFeatureRef]
) -> None:
    pads = [getattr(model.processor, a, None) for a in _PAD_ATTRS]
    pads = [p for p in pads if p is not None]
    slots = int(np.isin(np.asarray(ids), pads).sum()) if pads else 0
    expected = sum(r.num_tokens for r in refs)
    if slots != expected:
        raise InvalidRequestError(
            f"the token prompt has {slots} media placeholder tokens; its media need {expected}"
        )


def prefix_keys(
    prefix: PrefixCache,
    model: LoadedModel,
    request: decoder_pb2.GenerateRequest,
    prompt: ProcessedPrompt,
) -> list[str]:
    """The prompt's APC block keys: its tokens, its media's content keys, the tenant salt."""
    if not prefix.enabled:
        return []
    pads = [getattr(model.processor, a, None) for a in _PAD_ATTRS]
    items = [(r.content_key, r.num_tokens) for r in media_refs(request)]
    try:
        spans = media_spans(prompt.input_ids, [p for p in pads if p is not None], items)
    except ValueError as exc:
        raise InvalidRequestError(str(exc)) from exc
    return prefix.keys(prompt.input_ids, spans, request.tenant)


def _json(text: str, name: str, kind: type) -> Any:
    if not text:
        return kind()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(f"{name} is not valid JSON: {exc}", param=name) from exc
    if not isinstance(value, kind):
        raise InvalidRequestError(f"{name} must be a JSON {kind.__name__}", param=name)
    return value
