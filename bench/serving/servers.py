"""The two servers under test: subprocesses started, probed, stopped and restarted."""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from shared.rpc.ports import free_port

from . import REPO


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
