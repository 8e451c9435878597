"""Prefix caching (APC) and the vision-feature cache (issue #5), measured on one running stack.

    .venv/bin/python bench/apc_bench.py                # small Qwen2.5-VL, 4k document, 10 turns
    .venv/bin/python bench/apc_bench.py --size tiny --doc-tokens 600 --turns 3   # quick check

One stack (`services.launcher.Stack`: cache service with a disk tier in a temporary folder,
encoder, decoder, gateway) on a random-weight Qwen2.5-VL checkpoint (`--size`, written once to
`--workdir` as bench/make_checkpoint.py does, mlx layout, bf16; or `--checkpoint DIR`).

1. Document prefill. A deterministic text-only document of about `--doc-tokens` prompt tokens
   (counted with the checkpoint's tokenizer, template overhead measured from usage; the real
   count is reported) plus a short question. Each request is non-streaming with
   `max_tokens` 1, timed as the wall time of the whole HTTP call: prefill + one sampled token +
   the fixed cost of HTTP, gRPC and prompt rendering (reported on its own as "short prompt": the
   median of `--repeats` tiny requests). Non-streaming because the first streamed chunk may
   carry no text (a random-weight model's first token may decode to nothing), and with one
   output token the two measure the same thing. Three ways:
   - cold: the prefix cache emptied (POST /v1/cache/reset) before the request, server warmed
     by an unrelated request of the same length first (median of `--cold-repeats`);
   - warm memory: the same request again, blocks from the decoder's pool (median of `--repeats`);
   - warm disk: the decoder and the cache service restarted (SIGTERM: the cache service flushes
     its queued disk writes; the decoder's writes to the cache service are waited for first), so
     both memory tiers are empty; an unrelated warm-up request, then the same request, whose
     blocks must come from the cache service's disk tier (median of `--disk-repeats` restarts).
   `cached_tokens` (usage) is reported for each and checked against the whole blocks of the
   prompt (never its last token).
2. A `--turns`-turn conversation about one `--image-size` noise PNG (data URI): each turn
   appends the previous answer (`--answer-tokens`, greedy) and a new question; the whole
   request is timed. Three modes, all starting from empty caches: both caches on; the prefix
   cache reset before every turn (feature cache only); both reset before every turn (no cache).
   The first mode's answers are the history the other two replay, so all three send the same
   requests. /v1/cache/stats before and after every turn give encoder runs (feature puts),
   feature hits (the encoder's lookups and the decoder's reads) and prefix matched tokens.
Every measured request starts after the decoder's block writes to the cache service of the one
before have landed, so no background write shares the CPU with it.

Output: a JSON summary (stdout; also `--json PATH`), then a markdown table with the ratios
(cold / warm memory, cold / warm disk, no feature cache / feature cache). Progress on stderr.
Exit 1 when a check fails (a warm request not reporting the expected cached tokens, a disk
phase with no disk hits). Issue #5's goal: warm-memory prefill at least 10x faster than cold.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
from PIL import Image
from tokenizers import Tokenizer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from services.launcher import Stack, StackConfig  # noqa: E402
from services.launcher.stack import Component  # noqa: E402

MODEL_ID = "apc-bench"
QUESTION = "Question: which three words appear most often in the document above?"
VOCABULARY = (
    "river stone lantern harbour meadow copper signal orchard violet engine lattice ember "
    "quarry falcon thistle granite beacon willow cobalt ferry saddle prism glacier tannery "
    "compass marble hollow juniper kettle ledger mosaic nickel oyster pepper quill ribbon"
)
WORDS = VOCABULARY.split()
TURN_QUESTIONS = (
    "What is in this picture?",
    "Which colours dominate it?",
    "Is there any text in the image?",
    "Describe the top left corner.",
    "What could this picture be used for?",
    "Is the picture sharp or blurry?",
    "How many distinct regions do you see?",
    "What is in the centre?",
    "Describe the bottom edge.",
    "Give the picture a title.",
)
MODES = ("both caches", "feature cache only", "no cache")
RESETS = {  # what is reset before every turn after the first, per mode
    "both caches": None,
    "feature cache only": {"prefix": True, "features": False},
    "no cache": {"prefix": True, "features": True},
}
FAILURES: list[str] = []
COUNTERS = (  # /v1/cache/stats fields that only grow (their deltas are per-request numbers)
    ".queries", ".query_tokens", ".matched_tokens", ".memory_hits", ".remote_hits", ".misses",
    ".blocks_written", ".hits", ".evictions", ".puts", ".disk_errors",
)  # fmt: skip


def note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def check(ok: bool, what: str) -> None:
    if not ok:
        FAILURES.append(what)
        note(f"CHECK FAILED: {what}")


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# ---- inputs -------------------------------------------------------------------------------


def ensure_checkpoint(args: argparse.Namespace) -> Path:
    if args.checkpoint:
        return Path(args.checkpoint)
    out = args.workdir / f"qwen2_5_vl-{args.size}-mlx-bf16"
    if not (out / "config.json").exists():
        note(f"writing the {args.size} checkpoint to {out}")
        cmd = [sys.executable, str(REPO / "bench" / "make_checkpoint.py"), "--size", args.size]
        cmd += ["--layout", "mlx", "--dtype", "bfloat16", "--out", str(out)]
        subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return out


def sentence(rng: random.Random, index: int) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(8, 16))]
    return f"{index + 1}. " + " ".join(words).capitalize() + "."


def document(tokenizer: Tokenizer, tokens: int, seed: int) -> str:
    """Deterministic sentences until the text holds about `tokens` tokens."""
    rng, parts, count = random.Random(seed), [], 0
    while count < tokens:
        parts.append(sentence(rng, len(parts)))
        count += len(tokenizer.encode(" " + parts[-1], add_special_tokens=False).ids)
    return " ".join(parts)


def noise_png_uri(size: int, seed: int) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def doc_messages(text: str, system: str | None = None) -> list[dict[str, Any]]:
    """The document request; `system` (warm-ups) changes the first block, so a warm-up shares
    no cached block with the measured document."""
    head = [{"role": "system", "content": system}] if system else []
    return [*head, {"role": "user", "content": f"{text}\n\n{QUESTION}"}]


# ---- the stack and its HTTP API -----------------------------------------------------------


@dataclass
class Bench:
    stack: Stack
    client: openai.OpenAI
    http: httpx.Client
    sent: int = 0

    def chat(self, messages: Any, max_tokens: int, rid: str = "") -> tuple[float, Any]:
        """(wall seconds, completion) of one greedy non-streaming request; `rid` its
        X-Request-Id (the decoder logs the request's prefill time under it)."""
        self.sent += 1
        headers = {"X-Request-Id": rid or f"apc-bench-untimed-{self.sent}"}
        start = time.perf_counter()
        reply = self.client.chat.completions.create(
            model=MODEL_ID, messages=messages, max_tokens=max_tokens, temperature=0,
            extra_headers=headers,
        )  # fmt: skip
        return time.perf_counter() - start, reply

    def stats(self) -> dict[str, Any]:
        response = self.http.get("/v1/cache/stats")
        response.raise_for_status()
        return response.json()

    def reset(self, prefix: bool, features: bool) -> None:
        """Wait until the decoder's queued block writes reached the cache service (a write
        landing after the reset would refill it), then reset."""
        self.drain()
        response = self.http.post("/v1/cache/reset", json={"prefix": prefix, "features": features})
        response.raise_for_status()

    def drain(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not writes_done(self.stats()):
            if time.monotonic() > deadline:
                raise RuntimeError(
                    "the decoder's prefix blocks never all reached the cache service"
                )
            time.sleep(0.1)  # poll interval

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while self.http.get("/ready").status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError("the gateway did not become ready")
            time.sleep(0.2)  # poll interval


def writes_done(stats: dict[str, Any]) -> bool:
    """Every block the decoder handed to its remote tier has been put (both counters count from
    the processes' start; the decoder and the cache service are restarted together)."""
    service = stats.get("cache_service") or {}
    return service.get("kv", {}).get("puts", 0) >= stats["prefix_cache"]["blocks_written"]


def flat(tree: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in (tree or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat(value, name + "."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = value
    return out


def delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    """The counters of /v1/cache/stats that moved (gauges such as entries are left out)."""
    b, a = flat(before), flat(after)
    return {k: a[k] - b.get(k, 0) for k in a if k.endswith(COUNTERS) and a[k] != b.get(k, 0)}


def stack_config(args: argparse.Namespace, checkpoint: Path, root: Path) -> StackConfig:
    return StackConfig(
        model=str(checkpoint),
        served_model_name=MODEL_ID,
        cache_disk_path=str(root / "disk"),
        log_dir=root / "logs",
        grace=2.0,
        max_model_len=args.doc_tokens + 1024,
        decoder_args=list(args.decoder_arg),
        gateway_args=["--health-interval", "0.5"],
    )


@contextmanager
def running(config: StackConfig) -> Iterator[tuple[Bench, float]]:
    """The started stack and its start-up seconds; stopped on any exit (SIGTERM included)."""
    stack = Stack(config)
    previous = signal.signal(signal.SIGTERM, _raise_exit)
    start = time.perf_counter()
    try:
        stack.start()
        started = time.perf_counter() - start
        client = openai.OpenAI(base_url=stack.base_url, api_key="-", max_retries=0, timeout=1800)
        with httpx.Client(base_url=stack.gateway_url, timeout=60) as http:
            yield Bench(stack, client, http), started
    finally:
        stack.stop()
        signal.signal(signal.SIGTERM, previous)


def _raise_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def restart_memory_tiers(bench: Bench) -> dict[str, Any]:
    """Restart the cache service, then the decoder (SIGTERM each; exit codes reported: 0 means
    the cache service flushed its queued disk writes), and wait for the gateway."""
    bench.drain()
    start, codes = time.perf_counter(), {}
    components: tuple[Component, ...] = ("cache", "decoder")
    for component in components:
        bench.stack.kill(component, 0, signal.SIGTERM)
        codes[component] = bench.stack.child(component).returncode()
        bench.stack.restart(component)
    bench.wait_ready()
    check(codes["cache"] == 0, f"cache service exit code {codes['cache']} on SIGTERM (not 0)")
    return {"exit_codes": codes, "seconds": time.perf_counter() - start}


def warm_up(bench: Bench, messages: list[dict[str, Any]], max_tokens: int = 1) -> Any:
    """An untimed request; retried while the gateway has not seen a restarted decoder yet."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return bench.chat(messages, max_tokens)[1]
        except openai.APIStatusError as exc:
            if exc.status_code != 503 or time.monotonic() > deadline:
                raise
            time.sleep(0.5)  # poll interval


# ---- 1. document prefill ------------------------------------------------------------------


@dataclass
class Timed:
    seconds: list[float] = field(default_factory=list)
    cached_tokens: list[int] = field(default_factory=list)
    prompt_tokens: list[int] = field(default_factory=list)
    stats: dict[str, float] = field(default_factory=dict)  # summed /v1/cache/stats deltas
    request_ids: list[str] = field(default_factory=list)

    def add(self, seconds: float, reply: Any, rid: str) -> None:
        usage = reply.usage
        details = usage.prompt_tokens_details
        self.request_ids.append(rid)
        self.seconds.append(seconds)
        self.cached_tokens.append(int(details.cached_tokens or 0) if details else 0)
        self.prompt_tokens.append(int(usage.prompt_tokens))

    def json(self) -> dict[str, Any]:
        return {"median_s": median(self.seconds), **asdict(self)}


def timed(bench: Bench, messages: list[dict[str, Any]], into: Timed, max_tokens: int = 1) -> Any:
    """One measured request, after the previous one's block writes have landed (so background
    writes to the cache service do not share the CPU with it)."""
    bench.drain()
    before = bench.stats()
    rid = f"apc-bench-{bench.sent + 1}"
    seconds, reply = bench.chat(messages, max_tokens, rid)
    for key, value in delta(before, bench.stats()).items():
        into.stats[key] = into.stats.get(key, 0) + value
    into.add(seconds, reply, rid)
    return reply


def short_prompt(bench: Bench, repeats: int) -> Timed:
    """The fixed cost of a request: a tiny prompt (after the first, from the prefix cache)."""
    out = Timed()
    for _ in range(repeats + 1):
        timed(bench, [{"role": "user", "content": "Hi"}], out)
    out.seconds, out.cached_tokens = out.seconds[1:], out.cached_tokens[1:]
    out.prompt_tokens, out.request_ids = out.prompt_tokens[1:], out.request_ids[1:]
    return out


def text_tokens(tokenizer: Tokenizer, target: int, overhead: int) -> int:
    """Document tokens for a whole prompt (template and question included) of about `target`."""
    question = len(tokenizer.encode(QUESTION, add_special_tokens=False).ids)
    return max(16, target - overhead - question - 2)


def cold_runs(bench: Bench, messages: list[dict[str, Any]], repeats: int) -> Timed:
    out = Timed()
    for _ in range(repeats):
        bench.reset(prefix=True, features=False)
        timed(bench, messages, out)
    return out


def disk_runs(bench: Bench, messages: list[dict[str, Any]], repeats: int,
              warm_up_text: str) -> tuple[Timed, list[dict[str, Any]]]:  # fmt: skip
    out, restarts = Timed(), []
    for i in range(repeats):
        restarts.append(restart_memory_tiers(bench))
        restarts[-1]["kv_disk_entries"] = bench.stats()["cache_service"]["kv"]["disk"]["entries"]
        warm_up(bench, doc_messages(warm_up_text, system=f"Warm-up after restart {i}."))
        timed(bench, messages, out)
    return out, restarts


def prefill_phase(bench: Bench, args: argparse.Namespace, tokenizer: Tokenizer) -> dict[str, Any]:
    floor = short_prompt(bench, args.repeats)
    hi = len(tokenizer.encode("Hi", add_special_tokens=False).ids)
    overhead = floor.prompt_tokens[0] - hi  # chat template around the user text
    tokens = text_tokens(tokenizer, args.doc_tokens, overhead)
    text, other = document(tokenizer, tokens, seed=0), document(tokenizer, tokens, seed=1)
    messages = doc_messages(text)
    note(f"prefill: warm-up with an unrelated document of the same length ({len(text)} chars)")
    warm_up(bench, doc_messages(other, system="Warm-up."))
    note(f"prefill: cold x{args.cold_repeats}")
    cold = cold_runs(bench, messages, args.cold_repeats)
    note(f"prefill: warm memory x{args.repeats}")
    warm = Timed()
    for _ in range(args.repeats):
        timed(bench, messages, warm)
    note(f"prefill: warm disk x{args.disk_repeats} (restarting the decoder and the cache service)")
    disk, restarts = disk_runs(bench, messages, args.disk_repeats, other)
    block = int(bench.stats()["prefix_cache"]["block_size"])
    return summarize_prefill(floor, cold, warm, disk, restarts, text, block)


def summarize_prefill(floor: Timed, cold: Timed, warm: Timed, disk: Timed,
                      restarts: list[dict[str, Any]], text: str,
                      block: int) -> dict[str, Any]:  # fmt: skip
    prompt = cold.prompt_tokens[0]
    check(block > 0, "the prefix cache is off (block_size 0)")
    expected = (prompt - 1) // block * block
    check(all(c == 0 for c in cold.cached_tokens), f"cold cached_tokens {cold.cached_tokens} != 0")
    for name, runs in (("warm memory", warm), ("warm disk", disk)):
        check(
            all(c == expected for c in runs.cached_tokens),
            f"{name} cached_tokens {runs.cached_tokens} != {expected} (whole blocks)",
        )
    check(disk.stats.get("cache_service.kv.disk.hits", 0) > 0, "warm disk: no kv disk hits")
    return {
        "prompt_tokens": prompt,
        "block_size": block,
        "document_chars": len(text),
        "expected_cached_tokens": expected,
        "short_prompt": floor.json(),
        "cold": cold.json(),
        "warm_memory": warm.json(),
        "warm_disk": disk.json(),
        "restarts": restarts,
        "ratios": {
            "cold/warm_memory": median(cold.seconds) / median(warm.seconds),
            "cold/warm_disk": median(cold.seconds) / median(disk.seconds),
        },
    }


# ---- 2. conversation about one image ------------------------------------------------------


def turn_messages(image: str, answers: list[str], turn: int) -> list[dict[str, Any]]:
    """Turn `turn` (0-based): the first question with the image, then each answer and the next
    question."""
    first = [
        {"type": "image_url", "image_url": {"url": image}},
        {"type": "text", "text": TURN_QUESTIONS[0]},
    ]
    messages: list[dict[str, Any]] = [{"role": "user", "content": first}]
    for i in range(1, turn + 1):
        question = TURN_QUESTIONS[i % len(TURN_QUESTIONS)] + (
            f" (turn {i + 1})" if i >= len(TURN_QUESTIONS) else ""
        )
        messages += [{"role": "assistant", "content": answers[i - 1]}]
        messages += [{"role": "user", "content": question}]
    return messages


def conversation(bench: Bench, mode: str, image: str, history: list[str] | None,
                 args: argparse.Namespace) -> tuple[Timed, list[str]]:  # fmt: skip
    """One mode's turns from empty caches; `history`: the answers to replay (None: its own)."""
    bench.reset(prefix=True, features=True)
    out, answers = Timed(), []
    for turn in range(args.turns):
        reset = RESETS[mode]
        if reset and turn:
            bench.reset(**reset)
        past = history if history is not None else answers
        reply = timed(bench, turn_messages(image, past, turn), out, args.answer_tokens)
        answers.append(reply.choices[0].message.content or "")
    return out, answers


def conversation_phase(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    image = noise_png_uri(args.image_size, seed=0)
    note("conversation: warm-up with another image")
    warm_up(bench, turn_messages(noise_png_uri(args.image_size, seed=1), [], 0), args.answer_tokens)
    modes: dict[str, Timed] = {}
    answers: dict[str, list[str]] = {}
    for mode in MODES:
        note(f"conversation: {mode}, {args.turns} turns")
        history = answers.get(MODES[0])
        modes[mode], answers[mode] = conversation(bench, mode, image, history, args)
    return summarize_conversation(modes, answers, args)


def mode_json(runs: Timed) -> dict[str, Any]:
    s = runs.stats
    later = runs.seconds[1:]
    return {
        "total_s": sum(runs.seconds),
        "mean_turn_s": statistics.fmean(runs.seconds),
        "mean_later_turn_s": statistics.fmean(later) if later else float("nan"),
        "encoder_runs": int(s.get("cache_service.features.puts", 0)),
        "feature_hits": int(
            s.get("cache_service.features.memory.hits", 0)
            + s.get("cache_service.features.disk.hits", 0)
        ),
        "prefix_matched_tokens": int(s.get("prefix_cache.matched_tokens", 0)),
        **asdict(runs),
    }


def summarize_conversation(modes: dict[str, Timed], answers: dict[str, list[str]],
                           args: argparse.Namespace) -> dict[str, Any]:  # fmt: skip
    out = {mode: mode_json(runs) for mode, runs in modes.items()}
    both, feat, none = (out[m] for m in MODES)
    check(none["encoder_runs"] == args.turns, f"no cache: {none['encoder_runs']} encoder runs")
    check(both["encoder_runs"] == 1, f"both caches: {both['encoder_runs']} encoder runs, not 1")

    def ratio(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
        return {
            "total": a["total_s"] / b["total_s"],
            "mean_later_turn": a["mean_later_turn_s"] / b["mean_later_turn_s"],
        }

    return {
        "turns": args.turns,
        "image": f"{args.image_size}x{args.image_size} noise PNG",
        "answer_tokens": args.answer_tokens,
        "same_answers_in_every_mode": all(a == answers[MODES[0]] for a in answers.values()),
        "modes": out,
        "ratios": {
            "no_feature_cache/feature_cache": ratio(none, feat),  # prefix reset in both
            "prefix_reset/prefix_kept": ratio(feat, both),  # features cached in both
            "no_cache/both_caches": ratio(none, both),
        },
    }


# ---- report -------------------------------------------------------------------------------


def decoder_prefill_ms(log: Path) -> dict[str, int]:
    """Request id -> prefill_ms of the decoder's "generated" log line (admission to the first
    token: the remote-tier preload and the feature fetch happen before admission)."""
    found: dict[str, int] = {}
    text = log.read_text(errors="replace") if log.exists() else ""
    for line in text.splitlines():
        if '"generated"' not in line:
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == "generated" and "prefill_ms" in event:
            found[str(event.get("request_id"))] = int(event["prefill_ms"])
    return found


def attach_prefill_ms(node: Any, found: dict[str, int]) -> None:
    """Add the decoder's prefill times next to every `request_ids` list in `node`."""
    if not isinstance(node, dict):
        return
    if "request_ids" in node:
        ms = [found.get(rid) for rid in node["request_ids"]]
        node["decoder_prefill_ms"] = ms
        node["decoder_prefill_median_ms"] = median([m for m in ms if m is not None])
    for value in node.values():
        attach_prefill_ms(value, found)


def prefill_ratios(prefill: dict[str, Any]) -> dict[str, float | None]:
    cold = prefill["cold"]["decoder_prefill_median_ms"]
    out: dict[str, float | None] = {}
    for key in ("warm_memory", "warm_disk"):
        warm = prefill[key]["decoder_prefill_median_ms"]
        out[f"cold/{key}"] = cold / warm if warm and warm == warm else None  # 0 ms, or NaN
    return out


def run_out(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"? ({exc})"
    return done.stdout.strip() if done.returncode == 0 else "?"


def header(args: argparse.Namespace, checkpoint: Path) -> dict[str, Any]:
    dirty = run_out(["git", "status", "--porcelain"]).splitlines()
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "device_note": args.device_note,
        "cpus": os.cpu_count(),
        "checkpoint": str(checkpoint),
        "source": f"{run_out(['git', 'log', '-1', '--format=%h %s'])} ({len(dirty)} dirty files)",
    }


def times(value: float | None, spec: str) -> str:
    return "" if value is None or value != value else format(value, spec) + "x"


def prefill_table(p: dict[str, Any]) -> str:
    rows = [
        f"| prefill, {p['prompt_tokens']}-token prompt | wall s (median) | decoder prefill ms "
        "(median) | cached tokens | cold / this, wall | cold / this, decoder prefill |",
        "|---|---:|---:|---|---:|---:|",
    ]
    floor = p["short_prompt"]
    rows.append(
        f"| short prompt (fixed cost) | {floor['median_s']:.3f} | "
        f"{floor['decoder_prefill_median_ms']:.0f} | {floor['prompt_tokens'][0]} tokens | | |"
    )
    for key in ("cold", "warm_memory", "warm_disk"):
        runs, ratio = p[key], f"cold/{key}"
        rows.append(
            f"| {key.replace('_', ' ')} | {runs['median_s']:.3f} | "
            f"{runs['decoder_prefill_median_ms']:.0f} | {sorted(set(runs['cached_tokens']))} | "
            f"{times(p['ratios'].get(ratio), '.1f')} | "
            f"{times(p['ratios_decoder_prefill_ms'].get(ratio), '.1f')} |"
        )
    return "\n".join(rows)


def conversation_table(c: dict[str, Any]) -> str:
    rows = [
        f"| {c['turns']}-turn conversation | total s | mean turn s | mean turn 2+ s | encoder "
        "runs | cached tokens (sum) | total / both caches |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    both = c["modes"][MODES[0]]["total_s"]
    for mode, m in c["modes"].items():
        rows.append(
            f"| {mode} | {m['total_s']:.3f} | {m['mean_turn_s']:.3f} | "
            f"{m['mean_later_turn_s']:.3f} | {m['encoder_runs']} | {sum(m['cached_tokens'])} | "
            f"{times(m['total_s'] / both, '.2f')} |"
        )
    fc = c["ratios"]["no_feature_cache/feature_cache"]
    rows.append(
        f"\nno feature cache / feature cache (prefix reset before every turn in both): "
        f"{times(fc['total'], '.2f')} total, {times(fc['mean_later_turn'], '.2f')} per turn 2+"
    )
    return "\n".join(rows)


def table(result: dict[str, Any]) -> str:
    return prefill_table(result["prefill"]) + "\n\n" + conversation_table(result["conversation"])


def counters(result: dict[str, Any]) -> str:
    lines = []
    for mode, m in result["conversation"]["modes"].items():
        lines.append(
            f"- {mode}: encoder runs {m['encoder_runs']}, feature hits {m['feature_hits']}, "
            f"prefix matched tokens {m['prefix_matched_tokens']}, per turn (s) "
            + ", ".join(f"{s:.3f}" for s in m["seconds"])
        )
    ratios = result["prefill"]["ratios"]
    lines.append(
        f"- goal (issue #5): warm-memory prefill >= 10x faster than cold: cold / warm memory "
        f"{ratios['cold/warm_memory']:.1f}x wall ("
        + ("met" if result["goal_warm_memory_10x"] else "NOT met")
        + f"), {times(result['prefill']['ratios_decoder_prefill_ms']['cold/warm_memory'], '.1f')}"
        " by the decoder's prefill time"
    )
    disk = result["prefill"]["warm_disk"]["stats"]
    lines.append(
        f"- warm disk: kv disk hits {int(disk.get('cache_service.kv.disk.hits', 0))}, decoder "
        f"remote hits {int(disk.get('prefix_cache.remote_hits', 0))}; restarts "
        + json.dumps(result["prefill"]["restarts"])
    )
    return "\n".join(lines)


# ---- main ---------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", choices=("tiny", "small"), default="small")
    p.add_argument("--checkpoint", type=Path, help="a Qwen2.5-VL folder instead of --size")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/prism-bench"))
    p.add_argument("--doc-tokens", type=int, default=4096, help="document prompt tokens (about)")
    p.add_argument("--repeats", type=int, default=5, help="warm-memory requests (median)")
    p.add_argument("--cold-repeats", type=int, default=1)
    p.add_argument("--disk-repeats", type=int, default=1, help="restarts, one request each")
    p.add_argument("--turns", type=int, default=10)
    p.add_argument("--answer-tokens", type=int, default=16)
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("--decoder-arg", action="append", default=[], help="e.g. --decoder-arg=--x=1")
    p.add_argument("--device-note", default="")
    p.add_argument("--json", type=Path, help="also write the JSON summary here")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (disk, logs)")
    args = p.parse_args(argv)
    if min(args.repeats, args.cold_repeats, args.disk_repeats, args.turns) < 1:
        p.error("--repeats, --cold-repeats, --disk-repeats and --turns must be >= 1")
    return args


def measure(args: argparse.Namespace, checkpoint: Path, root: Path) -> dict[str, Any]:
    tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    result: dict[str, Any] = {"header": header(args, checkpoint)}
    result["header"]["load_average_start"] = os.getloadavg()
    with running(stack_config(args, checkpoint, root)) as (bench, started):
        note(f"stack ready in {started:.1f} s")
        result["header"]["stack_start_s"] = started
        result["prefill"] = prefill_phase(bench, args, tokenizer)
        result["conversation"] = conversation_phase(bench, args)
    result["header"]["load_average_end"] = os.getloadavg()
    attach_prefill_ms(result, decoder_prefill_ms(root / "logs" / "decoder-0.log"))
    result["prefill"]["ratios_decoder_prefill_ms"] = prefill_ratios(result["prefill"])
    result["goal_warm_memory_10x"] = result["prefill"]["ratios"]["cold/warm_memory"] >= 10
    result["failed_checks"] = FAILURES
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    checkpoint = ensure_checkpoint(args)
    root = Path(tempfile.mkdtemp(prefix="apc-bench-"))
    ok = False
    try:
        result = measure(args, checkpoint, root)
        ok = True
    finally:
        if not args.keep:
            shutil.rmtree(root / "disk", ignore_errors=True)
        if args.keep or not ok:
            note(f"kept {root} (logs)")
        else:
            shutil.rmtree(root, ignore_errors=True)
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    print("\n" + table(result) + "\n\n" + counters(result))
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
