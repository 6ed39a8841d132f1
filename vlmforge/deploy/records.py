"""Deployment records: what a started runner is, kept as ``NAME.json`` in the state directory.

A record names the runner's processes by identity (:class:`~vlmforge.system.processes.ProcessIdentity`: pid, start
time, command line), not by pid alone, so a pid the kernel has since given to another process is never signalled;
or it names the runner's container. Deployment names become file names, so they are validated like model names
before anything is read or written. A record never holds the API key: only whether one is required and its
fingerprint (:mod:`vlmforge.deploy.auth`).
"""

from __future__ import annotations

import logging
import os
import subprocess
from datetime import datetime
from enum import Enum
from pathlib import Path

from pydantic import BaseModel, PrivateAttr, field_validator

from vlmforge.artifacts.manifest import check_name
from vlmforge.deploy.auth import AuthMode
from vlmforge.errors import DeployError
from vlmforge.system.processes import ProcessIdentity, cmdline

log = logging.getLogger(__name__)


class LauncherKind(str, Enum):
    """How a runner is started (``vlmforge deploy --launcher``)."""

    PROCESS = "process"
    """``mpirun -n TP ... vlmforge serve`` (the runner alone for TP 1) as a child of whoever deploys."""
    DOCKER = "docker"
    """A runner container of its own, through a Docker daemon."""


class ServeBackend(str, Enum):
    """What serves the model (``vlmforge deploy --backend``)."""

    VLMFORGE = "vlmforge"
    """vlmforge's own runner (``vlmforge serve``) on a build's engine directory."""
    TRTLLM_SERVE = "trtllm-serve"
    """TensorRT-LLM's own server (PyTorch backend) on a Hugging Face model folder, in NVIDIA's release container."""


def check_deployment_name(name: str) -> str:
    """``name`` if it can name a deployment (it names the record and log files); else a DeployError."""
    try:
        return check_name(name, "deployment name")
    except ValueError as exc:
        raise DeployError(f"{exc} (it names the deployment's files in the state directory): pass another "
                          "--name") from None


class Deployment(BaseModel):
    """A started runner, as recorded in the state directory."""

    name: str
    model: str
    build_id: str
    engine_dir: Path
    endpoint: str
    host: str
    port: int
    tp: int
    pid: int
    """The launcher: mpirun, or the runner itself for TP 1 on one host."""
    pid_file: Path | None = None
    """Where rank 0 wrote its pid: SIGTERM there drains the runner (None: trtllm-serve writes none)."""
    log: Path
    argv: list[str]
    source: str
    selection: str
    started_at: datetime
    container: str | None = None
    """The runner's container id, when it was started through a Docker daemon (``--launcher docker``; ``pid`` is
    then 0 and ``pid_file`` a path inside the container)."""
    image: str | None = None
    """The runner image of a container deployment."""
    probe: str | None = None
    """Where health is asked from here, when not at ``endpoint`` (a container's own address)."""
    launcher_process: ProcessIdentity | None = None
    """The launcher's identity when it started (records written before identities were kept: None, and its
    recorded argv is checked instead)."""
    rank0_process: ProcessIdentity | None = None
    """Rank 0's identity once it was healthy (None where its pid file is on another host, or in a container)."""
    auth: AuthMode = AuthMode.NONE
    """Whether clients must send an API key (the key itself is never recorded)."""
    key_fingerprint: str | None = None
    """:func:`vlmforge.deploy.auth.fingerprint` of the runner's key: which key it was given."""
    instance: str | None = None
    """The id vlmforge's runner was started with and reports on /health (records written before it, and
    trtllm-serve deployments: None)."""
    backend: ServeBackend = ServeBackend.VLMFORGE
    """What serves it (records written before backends existed: vlmforge's runner)."""
    options_file: Path | None = None
    """trtllm-serve: the LLM-API options file it was started with (in the state directory)."""
    _proc: subprocess.Popen | None = PrivateAttr(default=None)
    """The launcher process, when this process started it."""

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_name(value, "deployment name")

    @property
    def ref(self) -> str:
        return f"{self.model}#{self.build_id}"

    @property
    def kind(self) -> LauncherKind:
        return LauncherKind.DOCKER if self.container is not None else LauncherKind.PROCESS

    def launcher_identity(self) -> ProcessIdentity:
        """The launcher as recorded (an older record: its pid with the argv it was started with)."""
        return self.launcher_process or ProcessIdentity(pid=self.pid, cmdline=self.argv)

    def rank0_identity(self) -> ProcessIdentity | None:
        """Rank 0 as recorded; for an older record, the pid in its pid file if that process runs the tail of the
        recorded argv (the serve command). None for a container or where rank 0 is unknown here."""
        if self.container is not None:
            return None
        if self.rank0_process is not None:
            return self.rank0_process
        if self.pid_file is None:
            return None
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        now = cmdline(pid)
        if not now or self.argv[-len(now):] != now:
            return None
        return ProcessIdentity(pid=pid, cmdline=now)

    def rank0_pid(self) -> int | None:
        """Rank 0's pid on this machine, as recorded (None for a container deployment: its pid lives there)."""
        identity = self.rank0_identity()
        return identity.pid if identity is not None else None


def default_state_dir() -> Path:
    base = os.environ.get("VLMFORGE_STATE") or os.path.join(os.environ.get("XDG_STATE_HOME", "~/.local/state"),
                                                            "vlmforge")
    return Path(base).expanduser() / "deployments"


def record_path(state_dir: Path, name: str) -> Path:
    return state_dir / f"{check_deployment_name(name)}.json"


def log_path(state_dir: Path, name: str) -> Path:
    """Where the process launcher writes the runner's output."""
    return state_dir / f"{check_deployment_name(name)}.log"


def pid_path(state_dir: Path, name: str) -> Path:
    """Where rank 0 of a process deployment writes its pid."""
    return state_dir / f"{check_deployment_name(name)}.rank0.pid"


def write_record(deployment: Deployment, state_dir: Path) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    path = record_path(state_dir, deployment.name)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(deployment.model_dump_json(indent=2))
    tmp.replace(path)


def read_record(state_dir: Path, name: str) -> Deployment | None:
    """The record of ``name`` in ``state_dir``; None if there is none or it cannot be read (logged)."""
    path = record_path(state_dir, name)
    if not path.is_file():
        return None
    try:
        return Deployment.model_validate_json(path.read_text())
    except ValueError:
        log.warning("ignoring unreadable deployment record %s", path)
        return None


def remove_record(state_dir: Path, name: str) -> None:
    record_path(state_dir, name).unlink(missing_ok=True)


def recorded_names(state_dir: Path) -> list[str]:
    """The deployment names recorded in ``state_dir`` (files whose names are no deployment name are skipped)."""
    if not state_dir.is_dir():
        return []
    names = []
    for path in sorted(state_dir.glob("*.json")):
        try:
            names.append(check_deployment_name(path.stem))
        except DeployError:
            log.warning("ignoring %s: not a deployment record's name", path)
    return names
