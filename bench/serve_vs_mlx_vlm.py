"""Prism's OpenAI server vs `mlx_vlm.server` (mlx-vlm 0.7.10) under the same streaming load.

    .venv/bin/python bench/serve_vs_mlx_vlm.py --make-small                 # CPU: levels 1,8
    .venv/bin/python bench/serve_vs_mlx_vlm.py --model /ckpt --concurrency 1,8,32 \\
        --device-note "1x H100, MLX 0.32.4 CUDA"

Both servers run on loopback, on the same checkpoint (an mlx-layout folder, which both load;
`--make-small` writes the random-weight Qwen2.5-VL "small" preset of `bench/make_checkpoint.py`
in bf16), side by side for the whole run: Prism through its launcher (`python -m
services.launcher`: cache, encoder, decoder, gateway, each on a free port) with
`--prism-python`, mlx-vlm with `--peer-python -m mlx_vlm.server`. The peer's virtualenv lives
outside the repo:

    python3 -m venv /tmp/peer-venv
    /tmp/peer-venv/bin/pip install mlx-vlm==0.7.10 'mlx[cpu]==0.32.4'   # mlx[cuda] on a GPU

Load: for each prompt kind (text only; one image per request) and each concurrency level C,
`--requests-per-level` requests (default max(4, 2C)) go out through C closed-loop workers, each
a streaming `/v1/chat/completions` (greedy, `max_tokens`, `stream_options.include_usage`). The
two servers take turns level by level (the one that goes first alternates), so a noisy machine
disturbs both alike. Every request is distinct: its text starts with its own tag, and each
image is its own 448x448 noise picture (seeded by level and index), so neither feature caches
nor prefix caches hit. One warm-up request per server and kind goes first and is not counted.

Per request: TTFT (send -> first SSE chunk with text in `content`, `reasoning` or
`reasoning_content`), the gaps between such chunks (ITL as a client sees it: a chunk carrying
several tokens, or a token a server holds back, e.g. an incomplete UTF-8 sequence or a skipped
special token, shows as one long gap), TPOT ((last chunk - first chunk) / (tokens - 1): per
token, whatever the chunking) and output tokens (the usage chunk's `completion_tokens`, else
the text chunks). Per level: aggregate output tok/s = all tokens / (last response end - first
request start). "same text" compares each request's text between the servers, ignoring special
tokens, <think> tags and non-ASCII (the two detokenizers print those differently for the same
tokens). "load" is the machine's 1-minute load average when the level ended: on a shared
machine, compare rows with similar load. Failures (HTTP errors, dropped streams, a crashed
server) are counted and shown, never fatal; a server that died is restarted before its next
level (one that fails to start twice is given up on).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import math
import os
import platform
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
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


# ----------------------------------------------------------------------------- servers


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """One server under test: a subprocess in its own session, logging to a file."""

    name: str
    argv: list[str]
    port: int
    cwd: Path
    log_path: Path
    env: dict[str, str]
    ready_path: str  # GET -> 200 once the model is loaded (checked together with /v1/models)
    startup_timeout: float
    proc: subprocess.Popen[bytes] | None = None
    model_id: str = ""
    starts: int = 0
    failed_starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        self.starts += 1
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"\n==== start {self.starts}: {shlex.join(self.argv)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.argv,
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                ready = httpx.get(self.url + self.ready_path, timeout=5)
                if ready.status_code == 200 and self._loaded(ready):
                    models = httpx.get(self.url + "/v1/models", timeout=5)
                    if models.status_code == 200 and models.json().get("data"):
                        self.model_id = self.model_id or models.json()["data"][0]["id"]
                        return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(1.0)
        self.stop()
        raise RuntimeError(f"{self.name} not ready after {self.startup_timeout:.0f} s")

    def _loaded(self, response: httpx.Response) -> bool:
        if self.name != "mlx-vlm":
            return True
        try:  # mlx-vlm answers /health before its --model is loaded
            return bool(response.json().get("loaded_model"))
        except ValueError:
            return False

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)  # the launcher stops its children in order
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # own session: pgid == pid
            self.proc.wait(10)

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""


def prism_server(args: argparse.Namespace, model: Path, log_dir: Path) -> Server:
    port = free_port()
    argv = [str(args.prism_python), "-m", "services.launcher", "--model", str(model)]
    argv += ["--host", "127.0.0.1", "--gateway-port", str(port), "--log-dir", str(log_dir)]
    argv += ["--log-level", "WARNING", *args.prism_arg]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    src = args.prism_src
    if src != REPO:  # a snapshot's packages must win over the editable install's
        paths = [str(src), str(src / "protos"), os.environ.get("PYTHONPATH", "")]
        env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env.update(_env_pairs(args.prism_env))
    return Server(
        "prism", argv, port, src, log_dir / "launcher.log", env, "/ready", args.startup_timeout
    )


def _env_pairs(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            sys.exit(f"expected KEY=VALUE, got {pair!r}")
        out[key] = value
    return out


def _in_repo(path: str) -> bool:
    resolved = Path(path).resolve()
    return resolved == REPO or REPO in resolved.parents


def peer_server(args: argparse.Namespace, model: Path, log_dir: Path) -> Server:
    port = free_port()
    argv = [str(args.peer_python), "-m", "mlx_vlm.server", "--model", str(model)]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "WARNING", *args.peer_arg]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    # Keep the repo off the peer's path, but keep the rest of PYTHONPATH: a peer installed with
    # `pip install --target DIR` is found only through it.
    outside = [
        p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and not _in_repo(p)
    ]
    if outside:
        env["PYTHONPATH"] = os.pathsep.join(outside)
    else:
        env.pop("PYTHONPATH", None)
    env.update(_env_pairs(args.peer_env))
    cwd = Path(tempfile.mkdtemp(prefix="peer-cwd-"))  # keep the repo off the peer's sys.path
    server = Server(
        "mlx-vlm", argv, port, cwd, log_dir / "mlx-vlm.log", env, "/health", args.startup_timeout
    )
    server.model_id = str(model)  # mlx-vlm serves (or would load) whatever "model" names
    return server


# ----------------------------------------------------------------------------- requests


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


# ----------------------------------------------------------------------------- stats


@dataclass
class Row:
    server: str
    kind: str
    concurrency: int
    requests: int
    ok: int
    tokens: int
    wall_s: float
    tok_s: float
    ttft_p50: float
    ttft_p90: float
    itl_p50: float
    itl_p90: float
    tpot_p50: float
    e2e_p50: float
    tokens_per_request: float
    prompt_tokens_per_request: float
    errors: list[str]
    note: str = ""
    load1: float = math.nan  # the machine's 1-minute load average when the level ended
    results: list[Result] = field(default_factory=list, repr=False)


def pct(values: list[float], q: float) -> float:
    """The q-quantile, interpolated linearly between order statistics (p50 = the median)."""
    values = sorted(v for v in values if not math.isnan(v))
    if not values:
        return math.nan
    pos = q * (len(values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def summarize(server: str, kind: str, c: int, n: int, results: list[Result], note: str = "") -> Row:
    good = [r for r in results if r.ok]
    errors = sorted({r.error for r in results if not r.ok})
    tokens = sum(r.tokens for r in good)
    wall = (max(r.end for r in results) - min(r.start for r in results)) if results else math.nan
    return Row(
        server=server,
        kind=kind,
        concurrency=c,
        requests=n,
        ok=len(good),
        tokens=tokens,
        wall_s=wall,
        tok_s=tokens / wall if good and wall > 0 else math.nan,
        ttft_p50=pct([r.ttft for r in good], 0.5),
        ttft_p90=pct([r.ttft for r in good], 0.9),
        itl_p50=pct([g for r in good for g in r.gaps], 0.5),
        itl_p90=pct([g for r in good for g in r.gaps], 0.9),
        tpot_p50=pct([r.tpot for r in good], 0.5),
        e2e_p50=pct([r.end - r.start for r in good], 0.5),
        tokens_per_request=tokens / len(good) if good else math.nan,
        prompt_tokens_per_request=(
            sum(r.prompt_tokens for r in good) / len(good) if good else math.nan
        ),
        errors=errors,
        note=note,
        results=results,
        load1=os.getloadavg()[0],
    )


def _s(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.2f} s"


def _ms(x: float) -> str:
    return "-" if math.isnan(x) else f"{1e3 * x:.0f} ms"


def _ratio(a: float, b: float) -> str:
    return "-" if math.isnan(a) or math.isnan(b) or b == 0 else f"{a / b:.2f}"


def table(rows: list[Row]) -> str:
    head = (
        "| server | prompt | conc | ok / sent | in tok/req | out tok/req | out tok/s | TTFT p50 "
        "| TTFT p90 | ITL p50 | ITL p90 | TPOT p50 | e2e p50 | load |"
    )
    lines = [head, "|" + "---|" * 14]
    for r in rows:
        status = f"{r.ok}/{r.requests}" if r.ok else f"**failed** 0/{r.requests}"
        if 0 < r.ok < r.requests:
            status = f"**{r.ok}/{r.requests}**"
        cells = [r.server, r.kind, str(r.concurrency), status]
        if r.ok:
            cells += [f"{r.prompt_tokens_per_request:.0f}", f"{r.tokens_per_request:.1f}"]
            cells += [f"{r.tok_s:.1f}"]
            cells += [_s(r.ttft_p50), _s(r.ttft_p90), _ms(r.itl_p50), _ms(r.itl_p90)]
            cells += [_ms(r.tpot_p50), _s(r.e2e_p50)]
        else:
            cells += ["failed"] * 9
        cells.append("-" if math.isnan(r.load1) else f"{r.load1:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def visible(text: str) -> str:
    """What both servers should agree on for the same tokens: the text without <|...|> special
    tokens (Prism skips every special token the tokenizer declares, mlx-vlm only
    `all_special_ids`), without <think> tags (mlx-vlm moves thinking to `reasoning`) and
    without non-ASCII characters (the detokenizers render invalid UTF-8, which random weights
    produce all the time, differently)."""
    text = re.sub(r"<\|[^<>|]*\|>|</?think>", "", text)
    return text.encode("ascii", "ignore").decode()


def ratio_table(rows: list[Row]) -> str:
    by = {(r.server, r.kind, r.concurrency): r for r in rows}
    lines = [
        "| prompt | conc | out tok/s (higher is better) | TTFT p50 | ITL p50 | TPOT p50 "
        "(lower is better) | same text |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.server != "prism" or ("mlx-vlm", r.kind, r.concurrency) not in by:
            continue
        p = by["mlx-vlm", r.kind, r.concurrency]
        if not r.ok or not p.ok:
            cells = ["prism failed" if not r.ok else "mlx-vlm failed"] * 4 + ["-"]
        else:
            cells = [_ratio(r.tok_s, p.tok_s), _ratio(r.ttft_p50, p.ttft_p50)]
            cells += [_ratio(r.itl_p50, p.itl_p50), _ratio(r.tpot_p50, p.tpot_p50)]
            theirs = {q.tag: visible(q.text) for q in p.results if q.ok}
            both = [q for q in r.results if q.ok and q.tag in theirs]
            same = sum(visible(q.text) == theirs[q.tag] for q in both)
            cells.append(f"{same}/{len(both)}")
        lines.append(f"| {r.kind} | {r.concurrency} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- setup


def run_out(argv: list[str], cwd: Path = REPO) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"? ({exc})"
    return proc.stdout.strip() if proc.returncode == 0 else f"? ({proc.stderr.strip()[-200:]})"


def versions(python: Path, packages: tuple[str, ...], cwd: Path) -> str:
    code = (
        "import importlib.metadata as m, mlx.core as mx\n"
        f"print(', '.join(p + ' ' + m.version(p) for p in {packages!r}), mx.default_device())"
    )
    return run_out([str(python), "-c", code], cwd=cwd)


def prism_source(src: Path) -> str:
    """Where Prism's code came from and which decoder engine it has."""
    batched = (src / "services" / "decoder" / "scheduler.py").exists()
    engine = (
        "continuous batching (services/decoder/scheduler.py present)"
        if batched
        else "one request decodes at a time (no services/decoder/scheduler.py)"
    )
    if not (src / ".git").exists():
        return f"source {src} (not a git checkout); decoder: {engine}"
    head = run_out(["git", "log", "-1", "--format=%h %s"], cwd=src)
    decoder = run_out(["git", "log", "-1", "--format=%h", "--", "services/decoder"], cwd=src)
    dirty = run_out(["git", "status", "--porcelain", "--untracked-files=all"], cwd=src)
    dirty_decoder = [line for line in dirty.splitlines() if "services/decoder/" in line]
    tree = f"{len(dirty.splitlines())} uncommitted files" if dirty else "clean tree"
    if dirty_decoder:
        tree += f", {len(dirty_decoder)} of them in services/decoder"
    return (
        f"source {src} at {head} ({tree}); decoder: {engine}, services/decoder last "
        f"committed in {decoder}"
    )


def make_small(args: argparse.Namespace) -> Path:
    out = args.workdir / "qwen2_5_vl-small-mlx-bf16"
    if not (out / "config.json").exists():
        print(f"writing the small checkpoint to {out}", file=sys.stderr, flush=True)
        cmd = [str(args.prism_python), str(REPO / "bench" / "make_checkpoint.py"), "--size"]
        cmd += ["small", "--layout", "mlx", "--dtype", "bfloat16", "--out", str(out)]
        subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return out


def default_concurrency(prism_python: Path) -> str:
    device = run_out([str(prism_python), "-c", "import mlx.core as mx; print(mx.default_device())"])
    return "1,8" if "cpu" in device.lower() else "1,8,32"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", type=Path, help="an existing mlx-layout checkpoint folder")
    src.add_argument(
        "--make-small",
        action="store_true",
        help="write (once) and use WORKDIR/qwen2_5_vl-small-mlx-bf16 (the default)",
    )
    p.add_argument(
        "--concurrency",
        default=None,
        help="comma-separated levels; default 1,8 when MLX runs on the CPU, else 1,8,32",
    )
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--requests-per-level", type=int, default=0, help="0: max(4, 2 x concurrency)")
    p.add_argument("--prompts", default="text,image", help="comma-separated: text, image")
    p.add_argument("--image-size", type=int, default=448, help="square side in pixels")
    p.add_argument("--warmup", type=int, default=1, help="uncounted requests per server and kind")
    p.add_argument(
        "--level-warmup",
        action="store_true",
        help="before each level, C uncounted requests at concurrency C (compiles batch shapes)",
    )
    p.add_argument("--skip-peer", action="store_true", help="measure Prism only")
    p.add_argument("--skip-prism", action="store_true", help="measure mlx-vlm only")
    p.add_argument("--prism-python", type=Path, default=REPO / ".venv" / "bin" / "python")
    p.add_argument(
        "--prism-src",
        type=Path,
        default=REPO,
        help="run Prism's code from this folder (e.g. an exported commit; default: this repo)",
    )
    p.add_argument("--peer-python", type=Path, default=Path("/tmp/peer-venv/bin/python"))
    p.add_argument(
        "--prism-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra launcher flag (repeat; --prism-arg=--decoder-arg=--max-waiting=256)",
    )
    p.add_argument(
        "--peer-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra mlx_vlm.server flag (repeat; e.g. --peer-arg=--max-num-seqs=32)",
    )
    for side in ("prism", "peer"):
        p.add_argument(
            f"--{side}-env",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help=f"environment variable for the {side} server only (repeat), e.g. "
            + ("PRISM_MAX_NUM_SEQS=64" if side == "prism" else "PYTHONPATH=/opt/mlx-vlm"),
        )
    p.add_argument("--device-note", default="", help="printed in the header (hardware, backend)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/prism-bench"))
    p.add_argument("--log-dir", type=Path, default=None, help="default: WORKDIR/serve-<time>")
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--startup-timeout", type=float, default=900.0)
    p.add_argument("--json", type=Path, default=None, help="write every row and request here")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- main


def weight_dtypes(model: Path) -> str:
    """The dtypes stored in the checkpoint's first safetensors file (its JSON header)."""
    files = sorted(model.glob("*.safetensors"))
    if not files:
        return "?"
    with open(files[0], "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        meta = json.loads(f.read(size))
    counts: dict[str, int] = {}
    for name, info in meta.items():
        if name != "__metadata__":
            counts[info["dtype"]] = counts.get(info["dtype"], 0) + 1
    return ", ".join(f"{d} x{n}" for d, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def header(args: argparse.Namespace, model: Path, levels: list[int], servers: list[Server]) -> str:
    config = json.loads((model / "config.json").read_text())
    text_cfg = config.get("text_config", config)
    vision = config.get("vision_config", {})
    lines = [
        f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        f"device: {args.device_note or '(no --device-note)'}; host {platform.machine()}, "
        f"{os.cpu_count()} CPUs, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        f"model: {model} ({config.get('model_type')}, hidden {text_cfg.get('hidden_size')}, "
        f"{text_cfg.get('num_hidden_layers')} layers; vision depth {vision.get('depth')}, "
        f"hidden {vision.get('hidden_size')}; tensors {weight_dtypes(model)}, "
        f"quantization {config.get('quantization', 'none')})",
        f"load: max_tokens {args.max_tokens}, greedy, streaming; concurrency "
        f"{','.join(map(str, levels))}; requests per level "
        f"{args.requests_per_level or 'max(4, 2C)'}; prompts {args.prompts} "
        f"(image: one {args.image_size}x{args.image_size} PNG per request); warm-up "
        f"{args.warmup} per server and kind"
        + ("; C uncounted requests before each level" if args.level_warmup else ""),
    ]
    for s in servers:
        if s.name == "prism":
            lines.append(
                f"prism: {versions(args.prism_python, ('mlx',), REPO)}; "
                f"{prism_source(args.prism_src)}"
            )
        else:
            peer = versions(args.peer_python, ("mlx-vlm", "mlx"), s.cwd)
            lines.append(f"mlx-vlm: {peer} ({args.peer_python})")
        lines.append(f"  {s.name} argv: {shlex.join(s.argv)}")
    lines.append(f"command: {shlex.join([Path(sys.executable).name, *sys.argv])}")
    return "\n".join(lines)


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


def ensure_up(server: Server) -> str:
    """'' when the server is (or is again) up, else why not."""
    if server.alive():
        return ""
    if server.failed_starts >= 2:
        return "did not start"
    died = server.proc is not None
    try:
        if died:
            print(f"{server.name} died ({server.proc.returncode}); restarting", file=sys.stderr)
        server.start()
        return "restarted after a crash" if died else ""
    except RuntimeError as exc:
        server.failed_starts += 1
        print(f"{server.name} failed to start: {exc}", file=sys.stderr)
        return "did not start"


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    args.prism_src = args.prism_src.resolve()
    model = (args.model or make_small(args)).resolve()
    if not (model / "config.json").exists():
        sys.exit(f"{model}: no config.json")
    levels = [
        int(c) for c in (args.concurrency or default_concurrency(args.prism_python)).split(",")
    ]
    kinds = [k for k in args.prompts.split(",") if k]
    if set(kinds) - set(KINDS):
        sys.exit(f"--prompts: unknown kind in {kinds}; choose from {KINDS}")
    if not args.skip_peer and not args.peer_python.exists():
        sys.exit(
            f"{args.peer_python} missing: python3 -m venv /tmp/peer-venv && /tmp/peer-venv/bin/pip "
            "install mlx-vlm==0.7.10 'mlx[cpu]==0.32.4' (or pass --skip-peer)"
        )
    log_dir = args.log_dir or args.workdir / time.strftime("serve-%Y%m%d-%H%M%S")
    servers: list[Server] = []
    if not args.skip_prism:
        servers.append(prism_server(args, model, log_dir / "prism"))
    if not args.skip_peer:
        servers.append(peer_server(args, model, log_dir))
    print(f"logs: {log_dir}", file=sys.stderr, flush=True)

    rows: list[Row] = []
    try:
        for s in servers:
            tic = time.perf_counter()
            note = ensure_up(s)
            print(
                f"{s.name}: {note or 'ready'} in {time.perf_counter() - tic:.0f} s "
                f"(model id {s.model_id!r})",
                file=sys.stderr,
                flush=True,
            )
        head = header(args, model, levels, servers)
        print(head, file=sys.stderr, flush=True)

        turn = 0
        for kind in kinds:
            warm_tags = [f"warmup-{kind}-{i}" for i in range(args.warmup)]
            warm_images = {
                t: noise_png(10_000 + i, args.image_size) for i, t in enumerate(warm_tags)
            }
            for s in servers if warm_tags else ():
                if ensure_up(s) == "did not start":
                    continue
                body = bodies_for(s, kind, warm_tags, warm_images if kind == "image" else {}, 8)
                warm = asyncio.run(run_level(s, body, 1, args.request_timeout))
                bad = [r.error for r in warm if not r.ok]
                print(f"{s.name} {kind} warm-up: {bad or 'ok'}", file=sys.stderr, flush=True)
            for c in levels:
                n = args.requests_per_level or max(4, 2 * c)
                tags = [f"c{c}-r{i}" for i in range(n)]
                images = (
                    {t: noise_png(1000 * c + i, args.image_size) for i, t in enumerate(tags)}
                    if kind == "image"
                    else {}
                )
                warm_level = [f"w{c}-r{i}" for i in range(c if args.level_warmup else 0)]
                warm_images = (
                    {
                        t: noise_png(500_000 + 1000 * c + i, args.image_size)
                        for i, t in enumerate(warm_level)
                    }
                    if kind == "image"
                    else {}
                )
                order = servers if turn % 2 == 0 else servers[::-1]
                turn += 1
                for s in order:
                    note = ensure_up(s)
                    if note == "did not start":
                        rows.append(summarize(s.name, kind, c, n, [], note))
                        continue
                    if warm_level:  # C uncounted requests at once: batch shapes, kernels
                        body = bodies_for(s, kind, warm_level, warm_images, args.max_tokens)
                        asyncio.run(run_level(s, body, c, args.request_timeout))
                    body = bodies_for(s, kind, tags, images, args.max_tokens)
                    results = asyncio.run(run_level(s, body, c, args.request_timeout))
                    if not s.alive():
                        note = (note + "; " if note else "") + "crashed during the level"
                    row = summarize(s.name, kind, c, n, results, note)
                    rows.append(row)
                    print(
                        f"{s.name} {kind} c={c}: {row.ok}/{n} ok, {row.tok_s:.1f} tok/s, "
                        f"TTFT p50 {row.ttft_p50:.2f} s, ITL p50 {1e3 * row.itl_p50:.0f} ms"
                        + (f", errors {row.errors}" if row.errors else "")
                        + (f" ({note})" if note else ""),
                        file=sys.stderr,
                        flush=True,
                    )
    finally:
        for s in servers:
            s.stop()

    rows.sort(key=lambda r: (kinds.index(r.kind), r.concurrency, r.server != "prism"))
    print(f"```\n{head}\n```\n")
    print(table(rows))
    if len(servers) == 2:
        print("\nPrism / mlx-vlm:\n")
        print(ratio_table(rows))
    notes = [
        f"- {r.server} {r.kind} c={r.concurrency}: {r.note + '; ' if r.note else ''}"
        f"errors: {'; '.join(r.errors) or 'none'}"
        for r in rows
        if r.errors or r.note
    ]
    if notes:
        print("\n" + "\n".join(notes))
    if args.json:
        args.json.write_text(json.dumps({"header": head, "rows": [asdict(r) for r in rows]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
