"""Helpers for the end-to-end tests: a Stack on a tiny checkpoint, images, a loopback media
server, and direct gRPC probes of the backends."""

from __future__ import annotations

import base64
import functools
import http.server
import io
import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import openai
import pytest
from PIL import Image
from prism.v1 import cache_pb2, cache_pb2_grpc, decoder_pb2, decoder_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from services.launcher import Stack, StackConfig
from shared.api import LoadedModel, generate

MODEL_ID = "tiny-vl"
MAX_TOKENS = 12


def e2e_config(checkpoint: Path, tmp: Path, **overrides: Any) -> StackConfig:
    """A stack for tests: logs to files, short grace, fast health checks, loopback media."""
    media = tmp / "media"
    media.mkdir(parents=True, exist_ok=True)
    gateway_args = [
        "--allowed-local-media-path", str(media),
        "--allow-fetch-from", "127.0.0.1",
        "--health-interval", "0.5",
    ]  # fmt: skip
    cfg = StackConfig(
        model=str(checkpoint),
        served_model_name=MODEL_ID,
        log_dir=tmp / "logs",
        grace=2.0,
        startup_timeout=240.0,
        gateway_args=gateway_args,
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def media_dir(stack: Stack) -> Path:
    args = stack.config.gateway_args
    return Path(args[args.index("--allowed-local-media-path") + 1])


def png_bytes(seed: int, size: tuple[int, int] = (84, 56)) -> bytes:
    """A random RGB image (width, height); distinct seeds give distinct content keys."""
    w, h = size
    pixels = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def user(*parts: dict[str, Any], text: str = "What is in this picture?") -> list[dict[str, Any]]:
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def streamed_text(chunks: Iterable[Any]) -> str:
    """The text of a streamed chat completion (chunks without choices carry usage only)."""
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def assert_image_chat_matches_in_process(
    reference: LoadedModel, checkpoint: Path, tmp: Path, first: list[dict[str, Any]]
) -> None:
    """`first` (an image turn, streamed) and a follow-up turn about it (not streamed) through
    the whole stack give exactly the in-process greedy text of `reference`; a video is refused
    with a 400 (for models that take none)."""
    answer = generate(reference, first, max_tokens=MAX_TOKENS, temperature=0.0)
    follow_up = [*first, {"role": "assistant", "content": answer},
                 {"role": "user", "content": "And what colour dominates it?"}]  # fmt: skip
    with Stack(e2e_config(checkpoint, tmp)) as stack:
        client = openai.OpenAI(base_url=stack.base_url, api_key="x", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == [MODEL_ID]
        kwargs: dict[str, Any] = {"model": MODEL_ID, "temperature": 0, "max_tokens": MAX_TOKENS}
        streamed = streamed_text(
            client.chat.completions.create(messages=first, stream=True, **kwargs)
        )
        reply = client.chat.completions.create(messages=follow_up, **kwargs)
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(
                messages=[{"role": "user", "content": [
                    {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}},
                ]}], **kwargs,
            )  # fmt: skip
    assert answer and streamed == answer
    assert reply.choices[0].message.content == generate(
        reference, follow_up, max_tokens=MAX_TOKENS, temperature=0.0
    )


@contextmanager
def media_server(root: Path) -> Iterator[str]:
    """Serve `root` over HTTP on a free loopback port; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def decoder_stats(address: str) -> decoder_pb2.DecoderStatsResponse:
    with grpc.insecure_channel(address) as channel:
        stub = decoder_pb2_grpc.DecoderStub(channel)
        return stub.Stats(decoder_pb2.DecoderStatsRequest(), timeout=5)


def gateway_metric(stack: Stack, name: str, model: str = MODEL_ID) -> float:
    """One sample of the gateway's /metrics, e.g. `prism:num_requests_running` for `model`;
    0 while the metric has no sample for the model yet (labels appear at their first use)."""
    text = httpx.get(stack.gateway_url + "/metrics", timeout=5).raise_for_status().text
    for family in text_string_to_metric_families(text):
        if family.name != name:
            continue
        for sample in family.samples:
            if sample.name == name and sample.labels.get("model_name") == model:
                return float(sample.value)
        return 0.0
    raise AssertionError(f"{name} is not in the gateway's /metrics")


def reset_cache(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        stub = cache_pb2_grpc.CacheStub(channel)
        return stub.Reset(cache_pb2.CacheResetRequest(), timeout=5).removed_entries


def eventually(check: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    """Poll `check` until true (backing off to 0.25 s) or fail after `timeout` seconds."""
    deadline, delay = time.monotonic() + timeout, 0.02
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.25)


def log_text(stack: Stack, component: str, index: int = 0) -> str:
    path = stack.child(component, index).log_path  # type: ignore[arg-type]
    return path.read_text(errors="replace") if path else ""


def log_records(stack: Stack, component: str) -> list[dict[str, Any]]:
    """The JSON log lines of every replica of `component` (other lines are skipped)."""
    records = []
    for index in range(len(stack.children.get(component, []))):
        for line in log_text(stack, component, index).splitlines():
            if line.startswith("{"):
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    return records


def process_running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie waits for whoever adopted it to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
