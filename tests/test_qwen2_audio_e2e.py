"""Qwen2-Audio through the whole stack (cache, encoder, decoder, gateway as processes) with the
`openai` client: audio as `input_audio` base64, as an `audio_url` data URI and as an allowed
local path; several clips in one turn and one clip per turn; greedy text identical to the
in-process `shared.api.generate`; modalities in /v1/models and refusals of what the model lacks
or cannot decode (400, never 500), the stack serving on afterwards."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest

from services.launcher import Stack
from shared.api import LoadedModel, generate, load
from shared.media.audio import encode_wav
from shared.testing.qwen2_audio_fixture import SAMPLING_RATE, make_qwen2_audio_checkpoint
from tests.e2e_support import (
    MAX_TOKENS,
    data_uri,
    e2e_config,
    media_dir,
    png_bytes,
    streamed_text,
)

MODEL = "tiny-audio"


def wav(seconds: float, freq: float, seed: int, rate: int = SAMPLING_RATE) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    noise = np.random.default_rng(seed).normal(0, 0.05, t.size)
    return encode_wav((0.4 * np.sin(2 * np.pi * freq * t) + noise).astype(np.float32), rate)


def input_audio(data: bytes, fmt: str = "wav") -> dict[str, Any]:
    payload = {"data": base64.b64encode(data).decode(), "format": fmt}
    return {"type": "input_audio", "input_audio": payload}


def audio_url(url: str) -> dict[str, Any]:
    return {"type": "audio_url", "audio_url": {"url": url}}


def turn(*parts: dict[str, Any], text: str = "What is this sound?") -> dict[str, Any]:
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_qwen2_audio_checkpoint(tmp_path_factory.mktemp("qwen2_audio") / "hf", "hf")


@pytest.fixture(scope="module")
def stack(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    cfg = e2e_config(checkpoint, tmp_path_factory.mktemp("e2e_audio"), served_model_name=MODEL)
    with Stack(cfg) as running:
        yield running


def in_process(reference: LoadedModel, messages: list[dict[str, Any]]) -> str:
    """The same conversation in-process; every clip given as its file's bytes."""
    clips = iter(messages_bytes(messages))
    local = [
        {**m, "content": [
            {"type": "audio", "audio": next(clips)} if p["type"] != "text" else p
            for p in m["content"]
        ]} if isinstance(m["content"], list) else m
        for m in messages
    ]  # fmt: skip
    return generate(reference, local, max_tokens=MAX_TOKENS, temperature=0.0)


_FILES: dict[str, bytes] = {}  # local path -> bytes, for in_process


def messages_bytes(messages: list[dict[str, Any]]) -> list[bytes]:
    out = []
    for m in messages:
        for p in m["content"] if isinstance(m["content"], list) else []:
            if p["type"] == "input_audio":
                out.append(base64.b64decode(p["input_audio"]["data"]))
            elif p["type"] == "audio_url":
                url = p["audio_url"]["url"]
                out.append(base64.b64decode(url.partition(",")[2]) if url.startswith("data:")
                           else _FILES[url])  # fmt: skip
    return out


def chat(client: openai.OpenAI, messages: list[dict[str, Any]], stream: bool = False) -> str:
    kwargs: dict[str, Any] = {"model": MODEL, "messages": messages, "temperature": 0}
    if not stream:
        reply = client.chat.completions.create(max_tokens=MAX_TOKENS, **kwargs)
        assert reply.usage is not None and reply.usage.prompt_tokens > 20
        return reply.choices[0].message.content or ""
    return streamed_text(
        client.chat.completions.create(max_tokens=MAX_TOKENS, stream=True, **kwargs)
    )


def test_audio_through_the_gateway(stack: Stack, checkpoint: Path) -> None:
    client = openai.OpenAI(base_url=stack.base_url, api_key="unused", max_retries=0, timeout=120)
    models = {m.id: m.model_dump() for m in client.models.list().data}
    assert models[MODEL]["modalities"] == ["text", "audio"]

    reference = load(checkpoint)
    local = media_dir(stack) / "clip.wav"
    local.write_bytes(wav(1.7, 250, 3, rate=44100))  # resampled to 16 kHz by the encoder
    _FILES[str(local)] = local.read_bytes()
    conversations = [
        [turn(input_audio(wav(0.8, 440, 1)))],
        [
            turn(
                audio_url("data:audio/wav;base64," + base64.b64encode(wav(2.5, 900, 2)).decode()),
                audio_url(str(local)),
                text="Compare the two clips.",
            )
        ],  # fmt: skip
        [
            turn(input_audio(wav(0.6, 300, 4))),
            {"role": "assistant", "content": "A tone."},
            turn(input_audio(wav(1.2, 1500, 5), "wav"), text="And this one?"),
        ],  # fmt: skip
    ]
    for i, messages in enumerate(conversations):
        expected = in_process(reference, messages)
        assert expected.strip(), i  # random weights, yet some text to compare
        assert chat(client, messages, stream=i % 2 == 1) == expected, i

    image = {"type": "image_url", "image_url": {"url": data_uri(png_bytes(1))}}
    refusals = [
        ([turn(image)], "does not accept image input; it accepts text, audio"),
        ([turn(input_audio(b"RIFF\x00\x00\x00\x00WAVEjunk"))], "could not decode audio"),
        ([turn(input_audio(png_bytes(2)))], "unsupported audio format"),
        ([turn(input_audio(b"fLaC" + bytes(64), "flac"))], "could not decode audio"),
        ([turn(input_audio(wav(0.8, 440, 1), "ogg"))], "format"),
        ([turn(input_audio(wav(0.001, 440, 1)))], "too short"),
    ]  # fmt: skip
    for messages, needle in refusals:
        with pytest.raises(openai.BadRequestError) as err:
            chat(client, messages)
        assert needle in str(err.value), err.value
    assert chat(client, conversations[0]) == in_process(reference, conversations[0])
