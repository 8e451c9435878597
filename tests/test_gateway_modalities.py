"""The gateway and modalities, against fake backends: /v1/models lists each model's modalities;
a part of a modality the model lacks is a 400 naming the ones it takes; audio arrives as
`input_audio`, an `audio_url` (data URI, http via the guarded fetcher, allowed local path) and
reaches the encoder as MODALITY_AUDIO with the file's bytes, several per turn and one per turn,
in prompt order; bad audio parts are 400s in OpenAI's shape."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prism.v1 import common_pb2

from services.gateway.testing import (
    CanaryServer,
    FakeDecoder,
    FakeEncoder,
    FakeServer,
    FakeStack,
    model_info,
)
from tests.test_gateway_validation import assert_error

MAX_MEDIA = 4096
WAV = b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(range(200))  # the fakes never decode it
MP3 = b"ID3\x04" + bytes(200)
MODALITIES = {"aud": ("text", "audio"), "vl": ("text", "image", "video"), "txt": ("text",)}


@pytest.fixture(scope="module")
def canary() -> Iterator[CanaryServer]:
    server = CanaryServer({"clip.mp3": MP3})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, canary: CanaryServer) -> Iterator[FakeStack]:
    media = tmp_path_factory.mktemp("audio_media")
    (media / "clip.wav").write_bytes(WAV)
    models = [model_info(mid, mods) for mid, mods in MODALITIES.items()]
    encoder, decoder = FakeEncoder(models[:2]), FakeDecoder("d0", models)
    s = FakeStack(
        [FakeServer(encoder)],
        [FakeServer(decoder)],
        allowed_local_media_path=str(media),
        max_media_bytes=MAX_MEDIA,
        allow_fetch_from=["127.0.0.1"],
    )
    s.encoder, s.decoder, s.media = encoder, decoder, media
    yield s
    s.stop()


def chat(stack: FakeStack, messages: list[dict[str, Any]], model: str = "aud") -> httpx.Response:
    body = {"model": model, "messages": messages, "max_tokens": 3}
    return httpx.post(stack.url + "/v1/chat/completions", json=body, timeout=30)


def user(*parts: dict[str, Any]) -> dict[str, Any]:
    return {"role": "user", "content": [*parts, {"type": "text", "text": "Listen."}]}


def input_audio(data: bytes, fmt: str = "wav") -> dict[str, Any]:
    payload = {"data": base64.b64encode(data).decode(), "format": fmt}
    return {"type": "input_audio", "input_audio": payload}


def audio_url(url: str) -> dict[str, Any]:
    return {"type": "audio_url", "audio_url": {"url": url}}


PARTS = {
    "image": {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
    "video": {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}},
    "audio": input_audio(WAV),
}


def test_models_report_their_modalities(stack: FakeStack) -> None:
    data = httpx.get(stack.url + "/v1/models", timeout=10).json()["data"]
    assert {m["id"]: tuple(m["modalities"]) for m in data} == MODALITIES


@pytest.mark.parametrize(
    "model, part",
    [("aud", "image"), ("aud", "video"), ("vl", "audio"), ("txt", "audio"), ("txt", "image")],
)
def test_a_modality_the_model_lacks_is_a_400_naming_what_it_takes(
    stack: FakeStack, model: str, part: str
) -> None:
    calls = len(stack.encoder.calls)
    r = chat(stack, [user(PARTS[part])], model=model)
    err = assert_error(r, 400, f"does not accept {part} input; it accepts")
    assert err["message"].endswith(", ".join(MODALITIES[model]))
    assert err["param"] == "messages[0].content[0]"
    assert len(stack.encoder.calls) == calls  # refused before any encoding


def test_audio_sources_reach_the_encoder_as_audio(stack: FakeStack, canary: CanaryServer) -> None:
    data_url = "data:audio/wav;base64," + base64.b64encode(WAV).decode()
    sources = [
        (input_audio(WAV), WAV),
        (input_audio(MP3, "mp3"), MP3),
        (audio_url(data_url), WAV),
        (audio_url(str(stack.media / "clip.wav")), WAV),
        (audio_url("file://" + str(stack.media / "clip.wav")), WAV),
        (audio_url(canary.url("clip.mp3")), MP3),
    ]
    for part, expected in sources:
        r = chat(stack, [user(part)])
        assert r.status_code == 200, r.text
        (item,) = stack.encoder.calls[-1].items
        assert item.modality == common_pb2.MODALITY_AUDIO and item.data == expected


def test_several_clips_and_one_per_turn_keep_their_order(stack: FakeStack) -> None:
    clips = [WAV + bytes([i]) for i in range(4)]
    messages = [
        user(input_audio(clips[0]), input_audio(clips[1])),
        {"role": "assistant", "content": "Two tones."},
        user(input_audio(clips[2])),
        {"role": "assistant", "content": "A chirp."},
        user(audio_url("data:audio/wav;base64," + base64.b64encode(clips[3]).decode())),
    ]
    assert chat(stack, messages).status_code == 200
    assert [it.data for it in stack.encoder.calls[-1].items] == clips
    sent = stack.decoder.requests[-1].messages.messages
    per_turn = [[p.media.content_key for p in m.content if p.HasField("media")] for m in sent]
    assert [len(keys) for keys in per_turn] == [2, 0, 1, 0, 1]
    assert all(
        p.media.modality == common_pb2.MODALITY_AUDIO
        for m in sent
        for p in m.content
        if p.HasField("media")
    )


@pytest.mark.parametrize(
    "part, needle",
    [
        (input_audio(WAV, "ogg"), "format must be one of wav, mp3, flac"),
        ({"type": "input_audio", "input_audio": {"format": "wav"}}, "must be base64"),
        ({"type": "input_audio", "input_audio": "UklGRg=="}, "must be base64"),
        (
            {"type": "input_audio", "input_audio": {"data": "%%%not base64", "format": "wav"}},
            "base64",
        ),
        (input_audio(b""), "empty"),
        (input_audio(b"\x89PNG\r\n\x1a\n" + bytes(64)), "unsupported audio format"),
        (input_audio(b"#EXTM3U\nhttp://127.0.0.1/x.wav\n", "mp3"), "unsupported audio format"),
        (input_audio(bytes(MAX_MEDIA + 1)), f"{MAX_MEDIA}-byte limit"),
        (audio_url("ftp://example.com/a.wav"), "scheme"),
        (audio_url("/etc/passwd"), "outside the allowed directory"),
        (audio_url("http://169.254.169.254/latest"), "169.254.169.254"),
    ],
)
def test_bad_audio_parts_are_400(stack: FakeStack, part: dict[str, Any], needle: str) -> None:
    assert_error(chat(stack, [user(part)]), 400, needle)


def test_too_many_clips_in_one_request_is_a_400(stack: FakeStack) -> None:
    """Audio and video items have their own per-request cap (--max-media-per-request, 5)."""
    clips = [input_audio(WAV + bytes([i])) for i in range(6)]
    assert_error(chat(stack, [user(*clips)]), 400, "6 video and audio items in one request")
    assert chat(stack, [user(*clips[:5])]).status_code == 200
