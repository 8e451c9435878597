"""Qwen3-VL through the whole stack (cache, encoder, decoder, gateway as processes) with the
`openai` client: an image (data URI, streamed), then a video (data URI) and the image again;
greedy text identical to the in-process `shared.api.generate`. The DeepStack levels travel as
extra tensors of the feature cache entry; video timestamps are rebuilt by the decoder."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import openai
import pytest

from services.launcher import Stack
from shared.api import generate, load
from shared.testing.qwen3_vl_fixture import make_qwen3_vl_checkpoint
from tests.e2e_support import (
    MAX_TOKENS,
    data_uri,
    e2e_config,
    image_part,
    png_bytes,
    streamed_text,
    user,
)
from tests.media_samples import sample_video

MODEL = "tiny-qwen3-vl"


def chat(client: openai.OpenAI, messages: list[dict[str, Any]], stream: bool) -> str:
    kwargs: dict[str, Any] = {"model": MODEL, "messages": messages, "temperature": 0}
    if not stream:
        reply = client.chat.completions.create(max_tokens=MAX_TOKENS, **kwargs)
        return reply.choices[0].message.content or ""
    return streamed_text(
        client.chat.completions.create(max_tokens=MAX_TOKENS, stream=True, **kwargs)
    )


def test_image_and_video_through_the_gateway_match_in_process(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    tmp = tmp_path_factory.mktemp("qwen3-vl-e2e")
    checkpoint = make_qwen3_vl_checkpoint(tmp / "ckpt", "hf")
    video = Path(sample_video(tmp / "clip.mp4", n_frames=8, size=(84, 56))).read_bytes()
    video_uri = "data:video/mp4;base64," + base64.b64encode(video).decode()
    image = data_uri(png_bytes(1, (96, 64)))
    requests = {
        "image": (user(image_part(image)), True),
        "video": (user({"type": "video_url", "video_url": {"url": video_uri}}), False),
        "image_again": (user(image_part(image)), False),  # the encoder's feature-cache hit
    }
    local = load(checkpoint)
    expected = {
        name: generate(local, messages, max_tokens=MAX_TOKENS, temperature=0.0)
        for name, (messages, _) in requests.items()
    }
    assert all(expected.values()) and expected["image"] != expected["video"]
    config = e2e_config(checkpoint, tmp, served_model_name=MODEL)
    with Stack(config) as stack:
        client = openai.OpenAI(base_url=stack.base_url, api_key="unused", max_retries=0)
        models = client.models.list().data
        assert [m.id for m in models] == [MODEL]
        for name, (messages, stream) in requests.items():
            assert chat(client, messages, stream) == expected[name], name
