"""Soak (issue #9; `make soak`, not in CI): the stack at steady concurrency for `--minutes`,
with a decoder replica SIGKILLed (and restarted) every `--kill-every` seconds.

    .venv/bin/python bench/soak.py                             # 30 min, demo checkpoint
    .venv/bin/python bench/soak.py --minutes 3 --kill-every 20 # a quick check
    make soak SOAK_MINUTES=60 SOAK_ARGS="--concurrency 16"

One stack (`services.launcher.Stack`: cache, encoder, `--decoders` decoders, gateway) on the
built-in demo checkpoint (tiny random-weight Qwen2.5-VL, MLX only; `--model DIR` for another),
run in float32 so that greedy output does not depend on how requests are batched.

Workload: a fixed set of prompts (text of several lengths, some sharing long prefixes so the
prefix cache is used, and a few distinct images), each with its greedy reference text taken
from the stack before the soak starts (`--max-tokens`, `ignore_eos`: every completion has
exactly that many tokens). `--concurrency` clients loop over them, alternating streaming and
non-streaming requests. Every completion is checked:
- exact: the reference text, finish reason `length` (and `data: [DONE]` for a stream);
- a clean retryable failure: HTTP 429/502/503/504 with an OpenAI error body, or (a stream cut
  by a kill) an in-band `server_error` event followed by `[DONE]`; the client retries (up to
  `--max-retries`, after `Retry-After` or 0.2 s) and the retry must then be exact;
- anything else is a failure: corrupted (wrong text, wrong finish), unclean (another status,
  a reset connection, a stream without its end), or lost (retries exhausted).
Memory: the RSS of every process (/proc/PID/status VmRSS) every `--sample-every` seconds. A
process counts as flat when, after `--warmup` seconds of its life, the median of its last third
of samples exceeds the median of its first third by at most max(`--rss-tolerance-mb`, 5%).
Decoders restart at each kill, so each of their lifetimes is judged on its own (when long
enough to have six samples after its warm-up).

Output: progress on stderr every `--report-every` seconds; at the end a JSON summary (stdout,
also `--json PATH`) and a markdown table. Exit 0 only with zero lost, corrupted and unclean
completions and every judged process flat.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from services.launcher import Stack, StackConfig

RETRYABLE = {429, 502, 503, 504}
MIB = 1024 * 1024


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--minutes", type=float, default=30.0, help="soak duration (30)")
    p.add_argument("--concurrency", type=int, default=8, help="client threads (8)")
    p.add_argument("--decoders", type=int, default=2, help="decoder replicas (2; >= 2)")
    p.add_argument("--kill-every", type=float, default=60.0, help="seconds between kills (60)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per completion (64)")
    p.add_argument("--max-retries", type=int, default=5)
    p.add_argument("--sample-every", type=float, default=10.0, help="RSS sampling period (s)")
    p.add_argument("--report-every", type=float, default=30.0, help="progress period (s)")
    p.add_argument("--warmup", type=float, default=60.0, help="RSS ignored this long (s)")
    p.add_argument("--rss-tolerance-mb", type=float, default=32.0)
    p.add_argument("--model", default=None, help="checkpoint folder (default: the demo)")
    p.add_argument("--workdir", type=Path, default=None, help="logs, demo (default: a temp dir)")
    p.add_argument("--json", type=Path, default=None, help="also write the summary here")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.decoders < 2:
        p.error("--decoders must be >= 2: one replica keeps serving while another is killed")
    return args


def log(message: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---- workload -------------------------------------------------------------------------------
def png_data_uri(seed: int, size: tuple[int, int] = (224, 168)) -> str:
    w, h = size
    pixels = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def prompts() -> list[list[dict[str, Any]]]:
    """Text of several lengths (two families share a long prefix: prefix-cache hits), and
    images (distinct content keys: the encoder and the feature cache work too)."""
    shared = "Here is a long shared context that many requests start with. " * 6
    out: list[list[dict[str, Any]]] = []
    for i in range(6):
        out.append([{"role": "user", "content": f"Question {i}: what comes after {i}?"}])
        out.append([{"role": "user", "content": f"{shared} Now answer question {i}."}])
    for seed in range(4):
        parts = [
            {"type": "image_url", "image_url": {"url": png_data_uri(seed)}},
            {"type": "text", "text": f"Describe picture {seed}."},
        ]
        out.append([{"role": "user", "content": parts}])
    return out


@dataclass
class Attempt:
    """One HTTP exchange, classified."""

    kind: str  # "ok" | "retryable" | "corrupted" | "unclean"
    detail: str = ""
    retry_after: float = 0.0
    text: str = ""


def _request(model: str, messages: list[dict[str, Any]], max_tokens: int, stream: bool) -> dict:
    return {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
    }


def _error_status(reply: httpx.Response) -> Attempt:
    try:
        error = reply.json()["error"]
        shaped = isinstance(error, dict) and {"message", "type"} <= set(error)
    except (ValueError, KeyError, TypeError):
        shaped = False
    detail = f"HTTP {reply.status_code}: {reply.text[:200]}"
    if reply.status_code in RETRYABLE and shaped:
        return Attempt("retryable", detail, float(reply.headers.get("retry-after") or 0.2))
    return Attempt("unclean", detail)


def attempt(http: httpx.Client, body: dict[str, Any], expected: str | None) -> Attempt:
    """One request; `expected` None records the text (references) instead of checking it."""
    try:
        if not body["stream"]:
            reply = http.post("/v1/chat/completions", json=body)
            if reply.status_code != 200:
                return _error_status(reply)
            choice = reply.json()["choices"][0]
            text, finish = choice["message"]["content"] or "", choice["finish_reason"]
            done, error = True, None  # a JSON answer is whole or absent
        else:
            text, finish, done, error = "", None, False, None
            with http.stream("POST", "/v1/chat/completions", json=body) as reply:
                if reply.status_code != 200:
                    reply.read()
                    return _error_status(reply)
                for line in reply.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        done = True
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        error = event["error"]
                        continue
                    for c in event["choices"]:
                        text += c["delta"].get("content") or ""
                        finish = c["finish_reason"] or finish
    except httpx.HTTPError as exc:
        return Attempt("unclean", f"{type(exc).__name__}: {exc}")
    if error is not None:  # cut mid-stream: clean when typed and the stream still ended
        clean = error.get("type") == "server_error" and done
        return Attempt("retryable" if clean else "unclean", f"in-band error: {error}", 0.2)
    if not done:
        return Attempt("unclean", "stream ended without [DONE]")
    if finish != "length" or (expected is not None and text != expected):
        return Attempt("corrupted", f"finish={finish!r} text={text[:60]!r}", text=text)
    return Attempt("ok", text=text)


@dataclass
class Tally:
    completions: int = 0  # prompts answered exactly (first try or after retries)
    first_try: int = 0
    after_retry: int = 0
    retries: int = 0
    lost: int = 0
    corrupted: int = 0
    unclean: int = 0
    retry_reasons: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)  # the first few, verbatim
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def fail(self, kind: str, detail: str) -> None:
        with self.lock:
            setattr(self, kind, getattr(self, kind) + 1)
            if len(self.failures) < 20:
                self.failures.append(f"{kind}: {detail}")


def reason(detail: str) -> str:
    """A short key for a retryable failure, for the counts."""
    if detail.startswith("in-band"):
        return "stream cut (in-band error)"
    return detail.split(":", 1)[0]


def client_loop(
    index: int,
    url: str,
    work: list[tuple[dict[str, Any], str]],
    stop: threading.Event,
    tally: Tally,
    max_retries: int,
) -> None:
    """Loop over the prompts (each client from its own offset), alternating stream modes."""
    order = list(range(len(work)))
    random.Random(index).shuffle(order)
    with httpx.Client(base_url=url, timeout=120) as http:
        n = 0
        while not stop.is_set():
            body, expected = work[order[n % len(order)]]
            body = {**body, "stream": (n + index) % 2 == 0}
            n += 1
            for tries in range(max_retries + 1):
                result = attempt(http, body, expected)
                if result.kind == "ok":
                    with tally.lock:
                        tally.completions += 1
                        if tries:
                            tally.after_retry += 1
                        else:
                            tally.first_try += 1
                    break
                if result.kind != "retryable":
                    tally.fail(result.kind, result.detail)
                    break
                with tally.lock:
                    tally.retries += 1
                    tally.retry_reasons[reason(result.detail)] += 1
                time.sleep(min(result.retry_after, 2.0))
            else:
                tally.fail("lost", f"{max_retries} retries: {result.detail}")


# ---- memory ---------------------------------------------------------------------------------
def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def running(pid: int) -> bool:
    """The process exists and is no zombie (a killed decoder's old pid is not reported)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@dataclass
class Lifetime:
    name: str
    pid: int
    started: float  # seconds since the soak began
    samples: list[tuple[float, float]] = field(default_factory=list)  # (t, MiB)


def sample_loop(
    stack: Stack, t0: float, period: float, stop: threading.Event, lives: dict[int, Lifetime]
) -> None:
    while True:
        now = time.monotonic() - t0
        for child in stack.all_children():
            pid = child.pid
            if pid is None or not child.alive():
                continue
            mib = rss_mib(pid)
            if mib is None:
                continue
            life = lives.setdefault(pid, Lifetime(child.name, pid, now))
            life.samples.append((round(now, 1), round(mib, 1)))
        if stop.wait(period):
            return


def judge(life: Lifetime, warmup: float, tolerance: float) -> dict[str, Any]:
    after = [mib for t, mib in life.samples if t >= life.started + warmup]
    out: dict[str, Any] = {
        "name": life.name,
        "pid": life.pid,
        "samples": len(life.samples),
        "first_mib": life.samples[0][1] if life.samples else None,
        "last_mib": life.samples[-1][1] if life.samples else None,
        "max_mib": max((m for _, m in life.samples), default=None),
    }
    if len(after) < 6:
        out["verdict"] = "short"  # killed or started too recently to judge
        return out
    third = len(after) // 3
    early, late = statistics.median(after[:third]), statistics.median(after[-third:])
    growth = late - early
    out.update(
        early_mib=round(early, 1),
        late_mib=round(late, 1),
        growth_mib=round(growth, 1),
        verdict="flat" if growth <= max(tolerance, 0.05 * early) else "GROWING",
    )
    return out


# ---- kills ----------------------------------------------------------------------------------
def kill_loop(stack: Stack, every: float, stop: threading.Event, kills: list[dict]) -> None:
    """SIGKILL decoder replicas in turn; each comes back at once on its port."""
    replica = 0
    while not stop.wait(every):
        name = f"decoder-{replica}"
        t = time.monotonic()
        stack.kill("decoder", replica, signal.SIGKILL)
        stack.restart("decoder", replica)
        kills.append({"replica": name, "down_s": round(time.monotonic() - t, 2)})
        log(f"killed and restarted {name} ({kills[-1]['down_s']} s down)")
        replica = (replica + 1) % len(stack.children["decoder"])


# ---- main -----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="prism-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if args.model is None:
        from shared.testing.demo import demo_checkpoint

        model, served = str(demo_checkpoint(workdir / "demo")), "soak-demo"
    else:
        model, served = args.model, "soak"
    config = StackConfig(
        model=model,
        served_model_name=served,
        num_decoders=args.decoders,
        dtype="float32",  # greedy text independent of batching: exact comparisons hold
        grace=5.0,
        log_dir=workdir / "logs",
        cache_disk_path=str(workdir / "cache-disk"),
        gateway_args=["--health-interval", "0.5"],
    )
    log(f"starting the stack ({args.decoders} decoders); logs in {workdir / 'logs'}")
    with Stack(config) as stack:
        work = []
        for messages in prompts():
            body = _request(served, messages, args.max_tokens, stream=False)
            with httpx.Client(base_url=stack.gateway_url, timeout=120) as http:
                ref = attempt(http, body, None)
            if ref.kind != "ok":
                log(f"reference request failed: {ref.detail}")
                return 1
            work.append((body, ref.text))
        log(f"{len(work)} prompts with reference texts; soaking for {args.minutes} min")

        tally, stop, kills = Tally(), threading.Event(), []
        lives: dict[int, Lifetime] = {}
        t0 = time.monotonic()
        threads = [
            threading.Thread(
                target=client_loop,
                args=(i, stack.gateway_url, work, stop, tally, args.max_retries),
                daemon=True,
            )
            for i in range(args.concurrency)
        ]
        threads.append(
            threading.Thread(target=sample_loop, args=(stack, t0, args.sample_every, stop, lives))
        )
        threads.append(
            threading.Thread(target=kill_loop, args=(stack, args.kill_every, stop, kills))
        )
        for thread in threads:
            thread.start()
        end = t0 + args.minutes * 60
        try:
            while time.monotonic() < end:
                time.sleep(min(args.report_every, max(0.0, end - time.monotonic())))
                alive = [life for life in list(lives.values()) if running(life.pid)]
                rss = {life.name: life.samples[-1][1] for life in alive if life.samples}
                log(
                    f"{(time.monotonic() - t0) / 60:.1f} min: {tally.completions} exact "
                    f"({tally.after_retry} after a retry), {tally.retries} retries, "
                    f"{tally.lost} lost, {tally.corrupted} corrupted, {tally.unclean} unclean; "
                    f"RSS MiB {json.dumps(rss, sort_keys=True)}"
                )
        except KeyboardInterrupt:
            log("interrupted: reporting what ran")
        stop.set()
        for thread in threads:
            thread.join(timeout=180)
        elapsed = time.monotonic() - t0

    memory = [
        judge(life, min(args.warmup, elapsed / 4), args.rss_tolerance_mb) for life in lives.values()
    ]
    judged = [m for m in memory if m["verdict"] != "short"]
    flat = all(m["verdict"] == "flat" for m in judged)
    summary = {
        "minutes": round(elapsed / 60, 2),
        "concurrency": args.concurrency,
        "decoders": args.decoders,
        "max_tokens": args.max_tokens,
        "prompts": len(work),
        "completions": tally.completions,
        "per_second": round(tally.completions / elapsed, 1),
        "first_try": tally.first_try,
        "after_retry": tally.after_retry,
        "retries": tally.retries,
        "retry_reasons": dict(tally.retry_reasons),
        "lost": tally.lost,
        "corrupted": tally.corrupted,
        "unclean": tally.unclean,
        "failures": tally.failures,
        "kills": kills,
        "memory": memory,
        "memory_flat": flat,
        "rss_samples": {f"{life.name}/{life.pid}": life.samples for life in lives.values()},
    }
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    print(markdown(summary))
    ok = not (tally.lost or tally.corrupted or tally.unclean) and flat and bool(judged)
    log("PASS" if ok else "FAIL")
    return 0 if ok else 1


def markdown(s: dict[str, Any]) -> str:
    columns = "process (pid)", "samples", "first", "early", "late", "growth", "max", "verdict"
    rows = ["| " + " | ".join(columns) + " | (MiB)", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for m in sorted(s["memory"], key=lambda m: (m["name"], m["pid"])):
        rows.append(
            f"| {m['name']} ({m['pid']}) | {m['samples']} | {m['first_mib']} | "
            f"{m.get('early_mib', '')} | {m.get('late_mib', '')} | {m.get('growth_mib', '')} | "
            f"{m['max_mib']} | {m['verdict']} |"
        )
    head = (
        f"{s['minutes']} min, {s['concurrency']} clients, {s['decoders']} decoders, "
        f"{len(s['kills'])} kills: {s['completions']} exact completions ({s['per_second']}/s; "
        f"{s['after_retry']} after a retry, {s['retries']} retries: {s['retry_reasons']}); "
        f"lost {s['lost']}, corrupted {s['corrupted']}, unclean {s['unclean']}."
    )
    return head + "\n\n" + "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
