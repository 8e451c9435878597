"""One child process of the stack: start, signal, wait, and show the end of its log."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

# Linux only: the child asks the kernel for SIGTERM when the launcher dies (even by SIGKILL),
# then execs the real service, so a crashed launcher or a killed pytest leaves no orphans.
# A tiny shim instead of `preexec_fn`: preexec_fn forces fork() and runs Python in the child,
# which is unsafe while grpc threads exist in this process. PDEATHSIG survives execve.
_PDEATHSIG_SHIM = (
    "import ctypes, os, sys\n"
    "ctypes.CDLL(None).prctl(1, 15)\n"  # PR_SET_PDEATHSIG, SIGTERM
    "if os.getppid() != int(sys.argv[1]):\n"  # the launcher died before prctl took effect
    "    sys.exit(1)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def _use_shim() -> bool:
    # The signal fires when the *thread* that forked exits: only safe from the main thread.
    return (
        sys.platform.startswith("linux") and threading.current_thread() is threading.main_thread()
    )


@dataclass
class Child:
    """A service subprocess; `name` is e.g. "encoder-0"; argv excludes the interpreter."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    stopping: bool = False  # set before a deliberate stop, so the monitor ignores the exit
    _log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> None:
        command = [sys.executable, *self.argv]
        if _use_shim():
            command = [sys.executable, "-S", "-c", _PDEATHSIG_SHIM, str(os.getpid()), *command]
        out: IO[bytes] | None = None
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            out = self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in wait()
        self.stopping = False
        # A new session: the terminal's Ctrl-C reaches only the launcher, which then stops the
        # children in order (gateway first, cache last) instead of all at once.
        self.proc = subprocess.Popen(
            command,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT if out is not None else None,
            start_new_session=True,
        )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def signal(self, sig: int) -> None:
        if self.proc is not None:  # send_signal ignores a process that has already exited
            self.proc.send_signal(sig)

    def wait(self, timeout: float | None) -> bool:
        """True when the process has exited within `timeout` seconds."""
        if self.proc is None:
            return True
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        if self._log is not None:
            self._log.close()
            self._log = None
        return True

    def tail(self, lines: int = 25) -> str:
        """The end of the child's log, for start-up failure messages."""
        if self.log_path is None or not self.log_path.exists():
            return "(output went to the launcher's terminal)"
        text = self.log_path.read_bytes()[-64_000:].decode("utf-8", "replace")
        return "\n".join(text.splitlines()[-lines:])


def stop_all(children: list[Child], timeout: float) -> None:
    """SIGTERM every child at once, wait up to `timeout` in total, then SIGKILL the rest."""
    for child in children:
        child.stopping = True
        child.signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for child in children:
        if not child.wait(max(0.0, deadline - time.monotonic())):
            child.signal(signal.SIGKILL)
            child.wait(5.0)
