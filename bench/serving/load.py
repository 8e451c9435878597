"""The load: request bodies, one streaming request measured, and closed-loop levels."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import time
from dataclasses import dataclass, field

import httpx

from .servers import Server

TEXT_PROMPT = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a lantern, "
    "a notebook and a small tin of oil. From the top he could see the harbour, the fishing boats "
    "returning with their nets, the gulls circling above the breakwater and the long grey line of "
    "the coast fading into the mist. "
) * 2 + "What happens next? Continue the story."
IMAGE_PROMPT = "Describe this image."
KINDS = ("text", "image")


def delta_text(delta: dict) -> str:
    """The generated text in one chunk's delta. A server that parses <think> blocks (mlx-vlm
    does) streams what follows <think> as reasoning, not content; mlx-vlm puts the same
    reasoning text in both `reasoning` and `reasoning_content`, so take one of the two."""
    reasoning = delta.get("reasoning_content") or delta.get("reasoning") or ""
    return reasoning + (delta.get("content") or "")


@dataclass
class Result:
    tag: str
    ok: bool
    start: float  # perf_counter at send
    end: float
    ttft: float = math.nan
    gaps: list[float] = field(default_factory=list)  # between content chunks
    tokens: int = 0
    tokens_from_usage: bool = False
    first: float = math.nan
    last: float = math.nan
    chunks: int = 0  # SSE chunks with content
    prompt_tokens: int = 0  # from usage, 0 when absent
    text: str = ""
    error: str = ""

    @property
    def tpot(self) -> float:
        if self.tokens < 2 or math.isnan(self.first):
            return math.nan
        return (self.last - self.first) / (self.tokens - 1)


def noise_png(seed: int, size: int) -> str:
    """A data: URI of a size x size PNG of uniform noise (seeded)."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def messages(kind: str, tag: str, image: str | None) -> list[dict]:
    if kind == "text":
        return [{"role": "user", "content": f"[{tag}] {TEXT_PROMPT}"}]
    parts = [
        {"type": "image_url", "image_url": {"url": image}},
        {"type": "text", "text": f"[{tag}] {IMAGE_PROMPT}"},
    ]
    return [{"role": "user", "content": parts}]


async def one_request(client: httpx.AsyncClient, url: str, tag: str, body: dict) -> Result:
    start = time.perf_counter()
    res = Result(tag=tag, ok=False, start=start, end=start)
    chunks, pieces = 0, []
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                res.error = f"HTTP {response.status_code}: {text[:200]}"
                return res
            done = False
            async for line in response.aiter_lines():
                now = time.perf_counter()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if event.get("error"):
                    res.error = f"stream error: {str(event['error'])[:200]}"
                    return res
                usage = event.get("usage")
                if usage and usage.get("completion_tokens") is not None:
                    res.tokens, res.tokens_from_usage = int(usage["completion_tokens"]), True
                    res.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                for choice in event.get("choices") or ():
                    content = delta_text(choice.get("delta") or {})
                    if content:
                        pieces.append(content)
                        if chunks == 0:
                            res.first, res.ttft = now, now - start
                        else:
                            res.gaps.append(now - res.last)
                        res.last = now
                        chunks += 1
            if not done:
                res.error = "stream ended without [DONE]"
                return res
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as exc:
        res.error = f"{type(exc).__name__}: {str(exc)[:200]}"
        return res
    finally:
        res.end = time.perf_counter()
    if chunks == 0:
        res.error = "no content in the stream"
        return res
    res.chunks, res.text = chunks, "".join(pieces)
    if not res.tokens_from_usage:
        res.tokens = chunks
    res.ok = True
    return res


async def run_level(
    server: Server, bodies: dict[str, dict], concurrency: int, timeout: float
) -> list[Result]:
    """Closed loop: `concurrency` workers, each sending its next request when one finishes."""
    queue: asyncio.Queue[tuple[str, dict]] = asyncio.Queue()
    for item in bodies.items():
        queue.put_nowait(item)
    results: list[Result] = []
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency)
    url = server.url + "/v1/chat/completions"
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout), limits=limits) as client:

        async def worker() -> None:
            while not queue.empty():
                results.append(await one_request(client, url, *queue.get_nowait()))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def bodies_for(
    server: Server, kind: str, tags: list[str], images: dict[str, str], mt: int
) -> dict[str, dict]:
    return {
        tag: {
            "model": server.model_id,
            "messages": messages(kind, tag, images.get(tag)),
            "max_tokens": mt,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        for tag in tags
    }
