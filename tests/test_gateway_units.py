"""Gateway pieces in isolation: config, address expansion, pools, message/param mapping."""

from __future__ import annotations

import asyncio
import socket

import grpc
import pytest

from services.gateway import backends
from services.gateway.backends import BackendPools, expand_address
from services.gateway.config import MiB, config_from_args
from services.gateway.messages import chat_messages, media_specs, responses_messages
from services.gateway.params import chat_tools, response_format, tool_choice
from services.gateway.rpc_errors import rpc_error
from services.gateway.schemas import ChatCompletionRequest, ResponsesRequest
from services.gateway.testing import FakeDecoder, FakeServer, model_info
from shared.errors import InvalidRequestError
from shared.rpc.interceptors import ORIGIN_KEY, ORIGIN_SERVICE

ENV = [
    "PRISM_ENCODERS",
    "PRISM_DECODERS",
    "PRISM_API_KEY",
    "PRISM_ALLOWED_LOCAL_MEDIA_PATH",
    "PRISM_MAX_IMAGES_PER_REQUEST",
    "PRISM_ALLOW_FETCH_FROM",
]


@pytest.fixture
def clean_env(monkeypatch):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_config_defaults_flags_and_env(clean_env):
    c = config_from_args([])
    assert (c.max_images_per_request, c.max_image_bytes, c.max_body_bytes) == (
        5,
        10 * MiB,
        50 * MiB,
    )
    assert c.api_key is None and c.allowed_local_media_path is None and c.allow_fetch_from == []
    c = config_from_args(["--encoder", "a:1,b:2", "--encoder", "c:3", "--decoder", "d:4"])
    assert c.encoders == ["a:1", "b:2", "c:3"] and c.decoders == ["d:4"]
    clean_env.setenv("PRISM_DECODERS", "x:1, y:2")
    clean_env.setenv("PRISM_API_KEY", "k")
    clean_env.setenv("PRISM_MAX_IMAGES_PER_REQUEST", "3")
    c = config_from_args(["--request-timeout", "7"])
    assert c.decoders == ["x:1", "y:2"] and c.api_key == "k"
    assert c.max_images_per_request == 3 and c.request_timeout == 7.0


def test_expand_address(monkeypatch):
    assert expand_address("127.0.0.1:50052") == ["127.0.0.1:50052"]
    assert expand_address("[::1]:50052") == ["[::1]:50052"]
    assert expand_address("localhost:50052") == ["localhost:50052"]

    def fake_getaddrinfo(host, port, *args, **kwargs):
        assert host == "decoders.svc.test"
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.1.0.1", port)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.1.0.2", port)),
            (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("fd00::3", port, 0, 0)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.1.0.1", port)),
        ]

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    assert expand_address("dns:///decoders.svc.test:50052") == [
        "10.1.0.1:50052",
        "10.1.0.2:50052",
        "[fd00::3]:50052",
    ]


def test_pools_expand_names_and_skip_dead_backends(monkeypatch):
    live = FakeServer(FakeDecoder("live", [model_info("m", ("text",))]))
    dead = "127.0.0.1:1"  # nothing listens there: connection refused, locally
    monkeypatch.setattr(
        backends, "expand_address", lambda a: [live.address, dead] if a == "pool.test:9" else [a]
    )

    async def run():
        pools = BackendPools([], ["pool.test:9"], interval=60)
        await pools.start()
        try:
            assert [b.address for b in pools.backends] == [live.address, dead]
            ok, down = pools.ready()
            assert not ok and any(dead in reason for reason in down)
            picks = {pools.candidates("decoder", "m")[0].address for _ in range(4)}
            assert picks == {live.address}
            assert list(pools.models()) == ["m"] and pools.candidates("decoder", "x") == []
        finally:
            await pools.close()

    try:
        asyncio.run(run())
    finally:
        live.stop()


def test_unavailable_marks_a_backend_down_only_when_the_backend_itself_is_gone():
    """UNAVAILABLE from a live servicer (its cache is down) keeps the backend in the pool;
    UNAVAILABLE without the servicer's trailer (a dead peer) takes it out."""
    live = FakeServer(FakeDecoder("live", [model_info("m", ("text",))]))

    def unavailable(trailing: tuple[tuple[str, str], ...]) -> grpc.aio.AioRpcError:
        return grpc.aio.AioRpcError(
            grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(*trailing), "x"
        )

    async def run():
        pools = BackendPools([], [live.address], interval=60)
        await pools.start()
        try:
            [backend] = pools.backends
            err = rpc_error(unavailable(((ORIGIN_KEY, ORIGIN_SERVICE),)), backend, pools)
            assert err.http_status == 503 and backend.healthy
            rpc_error(unavailable(()), backend, pools)
            assert not backend.healthy
        finally:
            await pools.close()

    try:
        asyncio.run(run())
    finally:
        live.stop()


def test_chat_message_parts():
    req = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [
                {"role": "developer", "content": "rules"},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "a"},
                        {"type": "image_url", "image_url": "http://x/a.png"},
                        {"type": "video_url", "video_url": {"url": "v.mp4"}, "fps": 1},
                        {"type": "input_audio", "input_audio": {"data": "AA==", "format": "wav"}},
                    ],
                },
                {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function"}]},
            ],
        }
    )
    msgs = chat_messages(req.messages)
    assert msgs[0].role == "system"
    specs = media_specs(msgs)
    assert [s.modality for s in specs] == ["image", "video", "audio"]
    assert specs[1].options == {"fps": 1.0} and specs[2].b64 == "AA=="
    assert '"c1"' in msgs[2].tool_calls_json


def test_responses_input_items():
    req = ResponsesRequest.model_validate(
        {
            "model": "m",
            "instructions": "sys",
            "input": [
                {"role": "user", "content": [{"type": "input_image", "image_url": "data:x"}]},
                {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": "42"},
            ],
        }
    )
    msgs = responses_messages(req)
    assert [m.role for m in msgs] == ["system", "user", "assistant", "tool"]
    assert msgs[3].tool_call_id == "c1" and msgs[3].parts[0].text == "42"
    with pytest.raises(InvalidRequestError):
        responses_messages(
            ResponsesRequest.model_validate({"model": "m", "input": [{"type": "x"}]})
        )


def test_param_mapping():
    assert tool_choice({"type": "function", "function": {"name": "f"}}) == "f"
    assert tool_choice({"type": "function", "name": "g"}) == "g"
    with pytest.raises(InvalidRequestError):
        tool_choice("sometimes")
    tools = chat_tools([{"type": "function", "name": "f", "parameters": {"type": "object"}}])
    assert tools == [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    ]
    fmt = response_format(
        {"type": "json_schema", "json_schema": {"schema": {"a": 1}, "strict": True}}, "rf"
    )
    assert fmt.type == 2 and fmt.json_schema == '{"a": 1}' and fmt.strict
    fmt = response_format({"type": "json_schema", "name": "x", "schema": {"b": 2}}, "text.format")
    assert fmt.json_schema == '{"b": 2}'
