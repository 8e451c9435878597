"""The launcher's process handling, against stand-in services (no model, fast)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.launcher import Stack, StackConfig, StackError
from services.launcher.cli import supervise
from services.launcher.probes import SERVING, grpc_health, http_status
from tests.e2e_support import process_running

REPO = Path(__file__).resolve().parents[1]
FAKE = "tests.launcher_fake_service"


def fake_config(tmp_path: Path, **overrides: object) -> StackConfig:
    env = {"PYTHONPATH": str(REPO), **overrides.pop("env", {})}  # type: ignore[dict-item]
    cfg = StackConfig(
        model="unused",
        log_dir=tmp_path / "logs",
        env=env,
        grace=1.0,
        startup_timeout=30.0,
        modules={c: FAKE for c in ("cache", "encoder", "decoder", "gateway")},
        cache_args=["--role", "cache"],
        encoder_args=["--role", "encoder"],
        decoder_args=["--role", "decoder"],
        gateway_args=["--role", "gateway"],
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def test_starts_in_order_waits_and_stops(tmp_path: Path) -> None:
    cfg = fake_config(tmp_path, num_encoders=2, num_decoders=2, env={"FAKE_READY_AFTER": "0.5"})
    with Stack(cfg) as stack:
        assert [c.name for c in stack.all_children()] == [
            "cache-0", "encoder-0", "encoder-1", "decoder-0", "decoder-1", "gateway-0",
        ]  # fmt: skip
        assert all(c.alive() for c in stack.all_children())
        assert http_status(stack.gateway_url + "/ready") == 200
        for address in [stack.address("cache"), *stack.addresses("encoder")]:
            assert grpc_health(address) == SERVING
        ports = set(stack.ports.values())
        assert len(ports) == 6  # every replica on its own port
        gateway_argv = stack.child("gateway").argv
        decoders = gateway_argv[gateway_argv.index("--decoder") + 1]
        assert decoders == ",".join(stack.addresses("decoder"))
        encoder_argv = stack.child("encoder", 1).argv
        assert encoder_argv[encoder_argv.index("--cache") + 1] == stack.address("cache")
        pids = [c.pid for c in stack.all_children()]
    assert not any(process_running(pid) for pid in pids if pid)
    assert "fake gateway stopped" in (tmp_path / "logs" / "gateway-0.log").read_text()


def test_text_model_runs_no_encoder(tmp_path: Path) -> None:
    with Stack(fake_config(tmp_path, with_encoder=False)) as stack:
        assert stack.children["encoder"] == []
        assert "--encoder" not in stack.child("gateway").argv


def test_failed_start_stops_the_rest_and_shows_the_log(tmp_path: Path) -> None:
    stack = Stack(fake_config(tmp_path, env={"FAKE_FAIL": "decoder"}))
    with pytest.raises(StackError, match="decoder-0 exited during start-up") as info:
        stack.start()
    assert "failing on purpose" in str(info.value)
    assert not any(c.alive() for c in stack.all_children())


def test_stop_kills_a_child_that_ignores_sigterm(tmp_path: Path) -> None:
    stack = Stack(fake_config(tmp_path, env={"FAKE_IGNORE_TERM": "encoder"})).start()
    start = time.monotonic()
    stack.stop(timeout=1.0)
    assert time.monotonic() - start < 10
    assert stack.child("encoder").returncode() == -signal.SIGKILL
    assert stack.child("decoder").returncode() == 0


def test_restart_one_component(tmp_path: Path) -> None:
    with Stack(fake_config(tmp_path)) as stack:
        old_pid = stack.child("encoder").pid
        stack.kill("encoder")
        assert grpc_health(stack.address("encoder"), timeout=0.5) is None
        assert stack.dead() == []  # a deliberate kill is not a crash
        decoder_pid = stack.child("decoder").pid
        stack.restart("encoder")
        assert stack.child("encoder").pid != old_pid
        assert grpc_health(stack.address("encoder")) == SERVING
        assert stack.child("decoder").pid == decoder_pid  # nothing else restarted


def test_supervise_stops_all_when_one_dies(tmp_path: Path) -> None:
    stack = Stack(fake_config(tmp_path)).start()
    stack.child("decoder").signal(signal.SIGKILL)  # a crash, not a deliberate stop
    assert supervise(stack, poll_s=0.05) == 1
    assert not any(c.alive() for c in stack.all_children())


def test_fixed_ports_and_collisions(tmp_path: Path) -> None:
    cfg = fake_config(tmp_path, encoder_port=45001, num_encoders=2, decoder_port=45002)
    with pytest.raises(StackError, match="assigned twice"):
        Stack(cfg)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_children_die_with_a_killed_launcher(tmp_path: Path) -> None:
    """Even SIGKILL of the launcher (no chance to clean up) leaves no orphan services."""
    script = (
        "import json, sys, time\n"
        "from tests.test_launcher import fake_config\n"
        "from services.launcher import Stack\n"
        "from pathlib import Path\n"
        "stack = Stack(fake_config(Path(sys.argv[1]))).start()\n"
        "print(json.dumps([c.pid for c in stack.all_children()]), flush=True)\n"
        "time.sleep(600)\n"
    )
    launcher = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert launcher.stdout is not None
        pids = json.loads(launcher.stdout.readline())
        assert len(pids) == 4 and all(process_running(p) for p in pids)
    finally:
        launcher.kill()
        launcher.wait()
    deadline = time.monotonic() + 15
    while any(process_running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(process_running(p) for p in pids)


def test_refuses_ports_already_in_use(tmp_path: Path) -> None:
    """gRPC binds with SO_REUSEPORT: without this check a second stack would share the ports."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        stack = Stack(fake_config(tmp_path, cache_port=busy.getsockname()[1]))
        with pytest.raises(StackError, match="ports already in use: cache-0"):
            stack.start()
    assert all(c.proc is None for c in stack.all_children())  # nothing was started
