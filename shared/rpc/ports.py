"""Free listening ports that client connections cannot steal.

A port found free by binding port 0 comes from the kernel's ephemeral range, the same range
outgoing connections draw their local ports from: between "found free" and the server's bind,
any client socket (a health probe, a test) may take it. Ports below that range are never handed
to clients, so a free one stays free unless another server picks it too.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LOWEST = 20000


def _ephemeral_start() -> int:
    try:
        return int(_RANGE_FILE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default; macOS uses 49152, which this stays below too


def free_port(host: str = "127.0.0.1", taken: set[int] | None = None) -> int:
    """A port below the ephemeral range that nothing listens on; `taken` (updated) avoids
    handing the same port out twice within one caller."""
    high = max(_ephemeral_start(), _LOWEST + 1000)
    for _ in range(200):
        port = random.randrange(_LOWEST, high)
        if taken is not None and port in taken:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        if taken is not None:
            taken.add(port)
        return port
    raise OSError("no free port below the ephemeral range")
