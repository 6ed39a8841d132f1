"""The launcher interface: start a runner for a plan and an engine directory, tell whether it runs, drain and stop
it, say where its log is. Two implementations: the process launcher (:mod:`.process`) and the container launcher
(:mod:`.container`); :mod:`vlmforge.deploy.launchers` chooses between them, the one place that does.

Also here, what both use: waiting for ``/health``, the endpoint clients use, ports.
"""

from __future__ import annotations

import json
import secrets
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from pydantic import BaseModel, Field, SecretStr

from vlmforge.deploy.auth import AuthMode, auth_headers, fingerprint
from vlmforge.deploy.machine import BuildInfo, Machine
from vlmforge.deploy.records import Deployment, LauncherKind
from vlmforge.errors import DeployError
from vlmforge.runner import InstanceId


class LaunchRequest(BaseModel):
    """One runner to start: what deploy decided (every refusal made) before anything starts."""

    build: BuildInfo
    engine_dir: Path
    name: str
    tp: int = Field(ge=1)
    host: str
    port: int = Field(ge=1, le=65535)
    state_dir: Path
    selection: str
    """Why this build (the record keeps it)."""
    source: str
    """Where the build came from, in words."""
    hostfile: Path | None = None
    gpus: bool = False
    serve_args: list[str] = Field(default_factory=list)
    wait_s: float = Field(default=600.0, gt=0)
    api_key: SecretStr | None = Field(default=None, exclude=True, repr=False)
    """Given to rank 0 through its environment; never serialised."""
    instance: InstanceId = Field(default_factory=lambda: secrets.token_hex(8))
    """A fresh id for this start, given to vlmforge's runner (``--instance-id``): the healthy answer waited for is
    then known to be this runner's, not another process's that took the port meanwhile."""

    @property
    def auth(self) -> AuthMode:
        return AuthMode.BEARER if self.api_key is not None else AuthMode.NONE

    @property
    def key_fingerprint(self) -> str | None:
        return fingerprint(self.api_key) if self.api_key is not None else None


class Launcher(Protocol):
    """How runners are started, found and stopped."""

    kind: LauncherKind

    def machine(self) -> Machine:
        """What a runner started this way can use (toolchains, GPUs, mpirun): what builds are chosen for."""
        ...

    def check(self, *, hostfile: Path | None) -> None:
        """Refuse (DeployError) what this launcher cannot do, before anything is pulled or started."""
        ...

    def start(self, request: LaunchRequest) -> Deployment:
        """Start the runner, wait until it is healthy, record it; stop it again and raise if it is not."""
        ...

    def running(self, deployment: Deployment) -> bool:
        """Whether the deployment's runner is still there (the same process or container that was started)."""
        ...

    def stop(self, deployment: Deployment, timeout: float) -> str:
        """Drain (SIGTERM to rank 0), stop after ``timeout``; what happened, in words. Signals nothing that is not
        provably the recorded runner."""
        ...

    def logs(self, deployment: Deployment) -> str:
        """Where the runner's output is: a file, or the command that shows it."""
        ...

    def discover(self) -> list[Deployment]:
        """Runners this launcher knows of beyond the state directory (a daemon's containers)."""
        ...


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host if host not in ("", "0.0.0.0") else "0.0.0.0", port))
        except OSError:
            return True
    return False


def endpoint_url(host: str, port: int) -> str:
    """Where clients on this host reach a runner listening on ``host`` (all interfaces: loopback)."""
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"


def runner_ok(status: int, body: bytes) -> bool:
    """vlmforge's runner is healthy: 200 and ``{"status": "ok"}``."""
    try:
        return status == 200 and json.loads(body).get("status") == "ok"
    except (ValueError, AttributeError):
        return False


def wait_healthy(url: str, timeout: float, *, died: Callable[[], str | None], log_tail: Callable[[], str],
                 api_key: SecretStr | None = None, healthy: Callable[[int, bytes], bool] = runner_ok,
                 instance: str | None = None) -> None:
    """Poll ``url``/health until ``healthy`` says so (default: vlmforge's runner's answer); DeployError with the log's
    tail if the runner dies (``died`` says how) or is late. ``/health`` needs no key; the runner's key is sent all
    the same, as any client would.

    The answer must be the started runner's: ``instance`` (what it was started with) must be the one it reports,
    and the started process must still be there. Otherwise another process took the port after deploy checked it
    (minutes before, the pull between), and the runner started here could not listen: a DeployError."""
    deadline = time.monotonic() + timeout
    request = urllib.request.Request(f"{url}/health", headers=auth_headers(api_key))
    while time.monotonic() < deadline:
        how = died()
        if how is not None:
            raise DeployError(f"{how} before it was healthy; the end of its log:\n{log_tail()}")
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                status, body = response.status, response.read()
        except (OSError, urllib.error.URLError, ValueError):
            status, body = 0, b""
        if status and healthy(status, body):
            answered = json.loads(body) if instance is not None else {"instance": None}
            if answered.get("instance") != instance:
                raise DeployError(f"another runner answers on {url} (model {answered.get('model')!r}, instance "
                                  f"{answered.get('instance')!r}), not the one just started: the port was taken "
                                  "after deploy checked it; pass another --port")
            how = died()  # where health names no runner (trtllm-serve): ours being gone says the answer is not its
            if how is not None:
                raise DeployError(f"{how}, yet {url} answered healthy: another process serves on that port; the end "
                                  f"of its log:\n{log_tail()}")
            return
        time.sleep(0.25)
    raise DeployError(f"the runner was not healthy within {timeout:.0f}s; the end of its log:\n{log_tail()}")


def tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
