"""Cost of the service split (issue #3): one image request through the running stack vs the
same request in-process vs the `prism generate` CLI.

    .venv/bin/python bench/split_latency.py                       # tiny checkpoint, 10 runs
    .venv/bin/python bench/split_latency.py --runs 20 --checkpoint /some/ckpt

The request: one user turn with a 224x168 PNG as a data URI plus "What is in this picture?",
greedy, `max_tokens` 16. The pictures are picked (in-process, before timing) among those whose
greedy reply runs all `max_tokens`, so every request does the same work. Paths:

- stack: cache, encoder, decoder and gateway as processes (`services.launcher.Stack`, loopback),
  through the OpenAI client; non-streaming for end-to-end latency, streaming for time to first
  token. Every run sends a picture never seen before (so the encoder runs its tower and the
  decoder fetches features from the cache, as for a new user image); the "features cached" row
  resends one picture, so the encoder finds it in the cache and skips the tower.
- in-process: `shared.api.generate` / `stream_generate` on a model already loaded.
- CLI: `prism generate` as a subprocess, so it includes interpreter start-up and model load;
  its time to first token is the first byte on stdout (the CLI streams).

Time to first token = send -> first chunk carrying text. Each path gets `--warmup` unrecorded
runs, then `--runs` recorded ones; the paths take turns run by run, so a busy machine disturbs
all of them alike. Output: a markdown table (median and p90 per path, in ms), plus start-up
costs and the generated token counts (all paths must produce the same greedy text).
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import openai
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from services.launcher import Stack, StackConfig  # noqa: E402
from shared.api import generate, load, stream_generate  # noqa: E402

PRISM = Path(sys.executable).with_name("prism")
MODEL_ID = "tiny-vl"
PROMPT = "What is in this picture?"
SIZE = (224, 168)  # width, height


def png_data_uri(seed: int) -> str:
    """A smooth 224x168 picture (gradients and a block placed by `seed`: distinct content per
    seed, so no feature cache hits) as a PNG data URI of a few KiB, like a small photo."""
    w, h = SIZE
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 // w, y * 255 // h, (x + y) * 255 // (w + h)], axis=-1)
    x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
    img[y0 : y0 + 40, x0 : x0 + 40] = rng.integers(0, 255, 3)
    buf = io.BytesIO()
    Image.fromarray(img.astype(np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def messages(uri: str) -> list[dict[str, Any]]:
    parts = [{"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": PROMPT}]
    return [{"role": "user", "content": parts}]


class Paths:
    """One callable per (path, measure); each returns (seconds, generated text)."""

    def __init__(self, model: Any, client: openai.OpenAI, checkpoint: Path, max_tokens: int):
        self.model, self.client, self.checkpoint = model, client, checkpoint
        self.max_tokens = max_tokens
        self.completion_tokens: list[int] = []  # as the gateway counts them

    def stack_e2e(self, uri: str) -> tuple[float, str]:
        start = time.perf_counter()
        reply = self.client.chat.completions.create(
            model=MODEL_ID, messages=messages(uri), max_tokens=self.max_tokens, temperature=0
        )
        elapsed = time.perf_counter() - start
        self.completion_tokens.append(reply.usage.completion_tokens if reply.usage else -1)
        return elapsed, reply.choices[0].message.content or ""

    def stack_ttft(self, uri: str) -> tuple[float, str]:
        start, first, text = time.perf_counter(), None, ""
        stream = self.client.chat.completions.create(
            model=MODEL_ID,
            messages=messages(uri),
            max_tokens=self.max_tokens,
            temperature=0,
            stream=True,
        )
        for chunk in stream:
            delta = chunk.choices[0].delta.content if chunk.choices else None
            if delta and first is None:
                first = time.perf_counter() - start
            text += delta or ""
        return (first if first is not None else time.perf_counter() - start), text

    def inproc_e2e(self, uri: str) -> tuple[float, str]:
        start = time.perf_counter()
        text = generate(self.model, messages(uri), max_tokens=self.max_tokens, temperature=0.0)
        return time.perf_counter() - start, text

    def inproc_ttft(self, uri: str) -> tuple[float, str]:
        start, first, text = time.perf_counter(), None, ""
        for chunk in stream_generate(
            self.model, messages(uri), max_tokens=self.max_tokens, temperature=0.0
        ):
            if chunk.text and first is None:
                first = time.perf_counter() - start
            text += chunk.text
        return (first if first is not None else time.perf_counter() - start), text

    def cli(self, uri: str) -> tuple[float, float, str]:
        """(end-to-end seconds, seconds to the first stdout byte, text)."""
        argv = [str(PRISM), "generate", "--model", str(self.checkpoint), "--prompt", PROMPT]
        argv += ["--image", uri, "--max-tokens", str(self.max_tokens), "--temperature", "0"]
        with tempfile.TemporaryFile() as err:
            start = time.perf_counter()
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err)
            assert proc.stdout is not None
            head = proc.stdout.read(1)
            first = time.perf_counter() - start
            rest = proc.stdout.read()  # the same buffered reader: nothing is skipped
            proc.wait()
            total = time.perf_counter() - start
            if proc.returncode != 0:
                err.seek(0)
                raise RuntimeError(f"prism generate failed: {err.read().decode(errors='replace')}")
        return total, first, (head + rest).decode().removesuffix("\n")


def full_length_pictures(model: Any, count: int, max_tokens: int) -> list[str]:
    """`count` distinct pictures whose greedy reply runs the whole `max_tokens` (a random-weight
    model may emit its end token early, and then requests would not do equal work)."""
    found, seed = [], 0
    while len(found) < count:
        uri = png_data_uri(seed)
        seed += 1
        *_, last = stream_generate(model, messages(uri), max_tokens=max_tokens, temperature=0.0)
        if last.finish_reason == "length":
            found.append(uri)
        if seed > 50 * count:
            raise RuntimeError("the model stops early on nearly every picture; lower --max-tokens")
    return found


def summary(values: list[float]) -> tuple[float, float]:
    """(median, p90) in milliseconds; p90 interpolated between order statistics."""
    p90 = statistics.quantiles(values, n=10, method="inclusive")[-1]
    return statistics.median(values) * 1e3, p90 * 1e3


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", type=Path, help="default: write the tiny Qwen2.5-VL fixture")
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=16)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    tmp = Path(tempfile.mkdtemp(prefix="split-latency-"))
    checkpoint = args.checkpoint
    if checkpoint is None:
        from shared.testing.fixtures import make_checkpoint  # test extras (torch)

        checkpoint = make_checkpoint("qwen2_5_vl", tmp / "tiny", "hf")

    start = time.perf_counter()
    model = load(checkpoint)
    load_s = time.perf_counter() - start
    config = StackConfig(
        model=str(checkpoint), served_model_name=MODEL_ID, log_dir=tmp / "logs", grace=2.0
    )
    running = Stack(config)
    start = time.perf_counter()
    running.start()
    stack_start_s = time.perf_counter() - start
    try:
        client = openai.OpenAI(base_url=running.base_url, api_key="-", max_retries=0, timeout=300)
        paths = Paths(model, client, checkpoint, args.max_tokens)
        pictures = full_length_pictures(model, 2 * (args.warmup + args.runs) + 1, args.max_tokens)
        cached_uri = pictures.pop()
        e2e: dict[str, list[float]] = {}
        ttft: dict[str, list[float]] = {}
        texts: dict[str, set[str]] = {cached_uri: {paths.inproc_e2e(cached_uri)[1]}}
        stack, cached = "stack (gateway -> encoder -> decoder)", "stack, features already cached"
        inproc, cli = "in-process `shared.api.generate`", "`prism generate` CLI (loads the model)"
        for run in range(args.warmup + args.runs):
            # Two new pictures per run (the stack must not find them cached), each sent down
            # every path that has no cache, so their greedy texts can be compared.
            one, two = pictures[2 * run], pictures[2 * run + 1]
            measures: list[tuple[str, dict[str, list[float]], Callable[[str], Any], str]] = [
                (stack, e2e, paths.stack_e2e, one),
                (stack, ttft, paths.stack_ttft, two),
                (cached, e2e, paths.stack_e2e, cached_uri),
                (cached, ttft, paths.stack_ttft, cached_uri),
                (inproc, e2e, paths.inproc_e2e, one),
                (inproc, ttft, paths.inproc_ttft, two),
            ]
            for name, table, fn, uri in measures:
                seconds, text = fn(uri)
                texts.setdefault(uri, set()).add(text)
                if run >= args.warmup:
                    table.setdefault(name, []).append(seconds)
            total, first, text = paths.cli(one)
            texts[one].add(text)
            if run >= args.warmup:
                e2e.setdefault(cli, []).append(total)
                ttft.setdefault(cli, []).append(first)
            print(f"run {run + 1}/{args.warmup + args.runs} done", file=sys.stderr)
        mismatched = [t for t in texts.values() if len(t) != 1]
        tokens = sorted(set(paths.completion_tokens))
    finally:
        running.stop()
        shutil.rmtree(tmp, ignore_errors=True)  # the generated checkpoint and the stack's logs

    load_avg = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\n{args.runs} runs after {args.warmup} warm-ups; {os.cpu_count()} CPUs, load average")
    print(f"{load_avg} at the end; checkpoint {args.checkpoint or 'tiny fixture'}\n")
    print("| path | e2e median (ms) | e2e p90 (ms) | TTFT median (ms) | TTFT p90 (ms) |")
    print("|---|---:|---:|---:|---:|")
    for name in e2e:
        (em, ep), (tm, tp) = summary(e2e[name]), summary(ttft[name])
        print(f"| {name} | {em:.1f} | {ep:.1f} | {tm:.1f} | {tp:.1f} |")
    print(f"\nstack start-up (4 processes, until /ready): {stack_start_s:.2f} s; in-process load:")
    print(f"{load_s:.2f} s; completion tokens per request (gateway usage): {tokens}; picture")
    print(f"{SIZE[0]}x{SIZE[1]} PNG, data URI of {len(png_data_uri(1)) / 1024:.1f} KiB.")
    print(
        "greedy texts identical across paths for every picture: "
        + ("yes" if not mismatched else f"NO ({len(mismatched)} pictures differ: {mismatched})")
    )
    return 1 if mismatched else 0


if __name__ == "__main__":
    sys.exit(main())
