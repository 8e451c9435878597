"""The whole stack (cache, encoder, decoder, gateway as processes) through the real OpenAI
client: images as data URI, http URL and local path; streaming; the responses API; and text
identical to the in-process `shared.api.generate` with greedy decoding."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from services.launcher import Stack
from shared.api import LoadedModel, generate, load
from tests.e2e_support import (
    MAX_TOKENS,
    MODEL_ID,
    data_uri,
    e2e_config,
    image_part,
    media_dir,
    media_server,
    png_bytes,
    user,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def stack(checkpoint_factory: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    checkpoint = checkpoint_factory("qwen2_5_vl", "hf")
    with Stack(e2e_config(checkpoint, tmp_path_factory.mktemp("e2e"))) as running:
        yield running


@pytest.fixture(scope="module")
def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(checkpoint_factory: Any) -> LoadedModel:
    """The same checkpoint in-process: what the services must reproduce token for token."""
    return load(checkpoint_factory("qwen2_5_vl", "hf"))


@pytest.fixture(scope="module")
def images(stack: Stack) -> dict[str, bytes]:
    out = {"a": png_bytes(1), "b": png_bytes(2, (56, 112))}
    for name, data in out.items():
        (media_dir(stack) / f"{name}.png").write_bytes(data)
    return out


def expected(reference: LoadedModel, messages: list[dict[str, Any]]) -> str:
    return generate(reference, messages, max_tokens=MAX_TOKENS, temperature=0.0)


def chat(client: openai.OpenAI, messages: list[dict[str, Any]], stream: bool) -> str:
    kwargs: dict[str, Any] = {"model": MODEL_ID, "messages": messages, "temperature": 0}
    kwargs["max_tokens"] = MAX_TOKENS
    if not stream:
        reply = client.chat.completions.create(**kwargs)
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert reply.usage is not None and reply.usage.completion_tokens > 0
        return reply.choices[0].message.content or ""
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_models_lists_the_checkpoint(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list().data]
    assert ids == [MODEL_ID]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_text_only(client: openai.OpenAI, reference: LoadedModel, stream: bool) -> None:
    messages = [{"role": "user", "content": "Tell me a story about a cat."}]
    assert chat(client, messages, stream) == expected(reference, messages)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_image_as_data_uri(
    client: openai.OpenAI, reference: LoadedModel, images: dict[str, bytes], stream: bool
) -> None:
    messages = user(image_part(data_uri(images["a"])))
    assert chat(client, messages, stream) == expected(reference, messages)


def test_image_as_http_url(
    stack: Stack, client: openai.OpenAI, reference: LoadedModel, images: dict[str, bytes]
) -> None:
    with media_server(media_dir(stack)) as base:
        got = chat(client, user(image_part(f"{base}/a.png")), stream=True)
    assert got == expected(reference, user(image_part(data_uri(images["a"]))))


def test_image_as_allowed_local_path(
    stack: Stack, client: openai.OpenAI, reference: LoadedModel, images: dict[str, bytes]
) -> None:
    got = chat(client, user(image_part(f"file://{media_dir(stack) / 'b.png'}")), stream=False)
    assert got == expected(reference, user(image_part(data_uri(images["b"]))))


def test_local_path_outside_the_allowed_folder_is_refused(
    stack: Stack, client: openai.OpenAI
) -> None:
    outside = media_dir(stack).parent / "secret.png"
    outside.write_bytes(png_bytes(3))
    with pytest.raises(openai.BadRequestError):
        chat(client, user(image_part(f"file://{outside}")), stream=False)


def test_two_images(
    client: openai.OpenAI, reference: LoadedModel, images: dict[str, bytes]
) -> None:
    parts = [image_part(data_uri(images["a"])), image_part(data_uri(images["b"]))]
    messages = user(*parts, text="Compare the two pictures.")
    assert chat(client, messages, stream=True) == expected(reference, messages)


def test_responses_api(client: openai.OpenAI, reference: LoadedModel) -> None:
    reply = client.responses.create(
        model=MODEL_ID, input="Write a haiku about rain.", max_output_tokens=MAX_TOKENS,
        temperature=0,
    )  # fmt: skip
    messages = [{"role": "user", "content": "Write a haiku about rain."}]
    assert reply.output_text == expected(reference, messages)


def test_grpc_example_client(
    stack: Stack, reference: LoadedModel, images: dict[str, bytes]
) -> None:
    """examples/grpc_generate.py: Encode, then a streamed Generate, straight to the services."""
    image = media_dir(stack) / "a.png"
    argv = [
        sys.executable, str(REPO / "examples" / "grpc_generate.py"),
        "--decoder", stack.address("decoder"), "--encoder", stack.address("encoder"),
        "--model", MODEL_ID, "--prompt", "What is in this picture?", "--image", str(image),
        "--max-tokens", str(MAX_TOKENS),
    ]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout == expected(reference, user(image_part(data_uri(images["a"]))))
    assert "completion tokens" in out.stderr


def test_a_conversation_about_one_image_reuses_its_prefix_and_features(
    stack: Stack, client: openai.OpenAI, reference: LoadedModel, images: dict[str, bytes]
) -> None:
    """Turn 2 repeats turn 1: its prompt prefix comes from the prefix cache (reported in
    usage), the image from the feature cache; another tenant reuses nothing."""
    first = user(image_part(data_uri(images["b"])), text="Describe this picture in detail.")
    answer = expected(reference, first)
    turn2 = [*first, {"role": "assistant", "content": answer},
             {"role": "user", "content": "And what colour dominates it?"}]  # fmt: skip
    replies = {}
    for name, messages, tenant in (("t1", first, ""), ("t2", turn2, ""), ("other", turn2, "x")):
        replies[name] = client.chat.completions.create(
            model=MODEL_ID, messages=messages, max_tokens=MAX_TOKENS, temperature=0,
            extra_headers={"X-APC-Tenant": tenant} if tenant else None,
        )  # fmt: skip
    t1, t2, other = replies["t1"].usage, replies["t2"].usage, replies["other"].usage
    assert replies["t1"].choices[0].message.content == answer
    assert replies["t2"].choices[0].message.content == expected(reference, turn2)
    assert replies["other"].choices[0].message.content == replies["t2"].choices[0].message.content
    assert t1 and t2 and other and t2.prompt_tokens_details and other.prompt_tokens_details
    cached = t2.prompt_tokens_details.cached_tokens
    # Whole 16-token blocks of turn 1's prompt (its last token never counts as cached).
    assert cached == (t1.prompt_tokens - 1) // 16 * 16 > 0
    assert other.prompt_tokens_details.cached_tokens == 0
    stats = httpx.get(f"{stack.base_url}/cache/stats", timeout=10).json()
    assert stats["prefix_cache"]["matched_tokens"] >= cached
    assert stats["cache_service"]["features"]["memory"]["hits"] >= 1  # turn 2's image
