"""`make run-local` without MODEL: the launcher generates the demo checkpoint, serves it, says
loudly that its weights are random, answers a chat request, and Ctrl-C stops everything."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from shared.rpc.ports import free_port
from shared.testing.demo import DEMO_MODEL_NAME
from tests.e2e_support import eventually, process_running

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_demo_launcher_serves_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "PRISM_HOME": str(tmp_path / "home")}
    env.pop("PRISM_MODEL", None)
    argv = [sys.executable, "-m", "services.launcher", "--gateway-port", str(port)]
    argv += ["--log-dir", str(tmp_path / "logs"), "--grace", "2", "--startup-timeout", "240"]
    launcher = subprocess.Popen(
        argv,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # As a terminal's foreground job: a suite started in the background (`make test &`)
        # passes SIGINT on ignored, and Python then never raises KeyboardInterrupt.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    stdout: list[str] = []
    stderr: list[str] = []
    readers = [
        threading.Thread(target=lambda: stdout.extend(launcher.stdout), daemon=True),  # type: ignore[arg-type]
        threading.Thread(target=lambda: stderr.extend(launcher.stderr), daemon=True),  # type: ignore[arg-type]
    ]
    for reader in readers:
        reader.start()
    try:
        eventually(
            lambda: any("Press Ctrl-C" in line for line in stdout) or launcher.poll() is not None,
            timeout=240,
            what="the launcher's summary",
        )
        assert launcher.poll() is None, "".join(stderr)
        text = "".join(stdout)
        assert f"http://127.0.0.1:{port}/v1" in text
        pids = [int(p) for p in re.findall(r"pid (\d+)", text)]
        assert len(pids) == 4  # cache, encoder, decoder, gateway
        assert "RANDOM WEIGHTS" in "".join(stderr)
        assert (tmp_path / "home" / "demo").is_dir()

        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            assert http.get("/ready").status_code == 200
            models = http.get("/v1/models").json()["data"]
            assert [m["id"] for m in models] == [DEMO_MODEL_NAME]
            assert models[0]["random_weights"] is True  # /v1/models says the output is noise
            reply = http.post(
                "/v1/chat/completions",
                json={
                    "model": DEMO_MODEL_NAME,
                    "messages": [{"role": "user", "content": "Hi!"}],
                    "max_tokens": 8,
                },
            )
            assert reply.status_code == 200, reply.text
            assert reply.json()["choices"][0]["message"]["role"] == "assistant"

        launcher.send_signal(signal.SIGINT)  # what Ctrl-C in the terminal does
        assert launcher.wait(timeout=60) == 0, "".join(stderr)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    for reader in readers:
        reader.join(timeout=5)
    assert not [pid for pid in pids if process_running(pid)], "orphaned service processes"
