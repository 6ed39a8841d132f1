"""Free ports and waiting for HTTP services; where the checkout is."""

from __future__ import annotations

import itertools
import os
import random
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


PORTS_PER_WORKER = 1000
FIRST_PORT = 20000
"""Each xdist worker hands out ports of its own block: gw0 20000-20999, gw1 21000-21999, ..."""


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def _ports() -> Iterator[int]:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    first = FIRST_PORT + index * PORTS_PER_WORKER
    if first + PORTS_PER_WORKER > _ephemeral_start():  # no block of its own below the kernel's range: bind(0)
        while True:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                yield sock.getsockname()[1]
    start = random.randrange(PORTS_PER_WORKER)
    for step in itertools.count():
        port = first + (start + step) % PORTS_PER_WORKER
        if _bindable(port):
            yield port


_PORTS = _ports()


def free_port() -> int:
    """A port for a server a test starts. Not bind(0)'s: between picking a port and a server binding it (seconds, for
    a runner that loads first), another xdist worker's bind(0) may pick the same one, or the kernel may hand it to
    a connection or to a deployment's MASTER_PORT. Each worker takes ports from its own block below the kernel's
    ephemeral range instead, in turn, skipping any in use."""
    return next(_PORTS)


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status < 500:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout}s")
