"""The process launcher: ``mpirun -n TP ... vlmforge serve ENGINE_DIR`` (the runner alone for TP 1 on one host),
started in a session of its own as a child of whoever deploys.

- The launcher gets a new environment (:mod:`vlmforge.deploy.environment`): the allow-listed variables, mpirun's
  own, and the API key, which only rank 0 keeps: under mpirun the other ranks are a second application context that
  runs ``env -u VLMFORGE_API_KEY ...`` (Open MPI has no per-rank environment; its ranks inherit mpirun's).
- The record names the launcher and rank 0 by identity (pid, start time, command line). Stopping checks both before
  any signal: a pid that now belongs to another process is reported and never signalled. Signals go through a pidfd
  where the kernel has them, so the check and the signal name the same process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from typing import Any
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from vlmforge.deploy.auth import API_KEY_ENV
from vlmforge.deploy.environment import forwarded, launch_environment
from vlmforge.deploy.launchers.base import LaunchRequest, endpoint_url, free_port, tail, wait_healthy
from vlmforge.deploy.machine import Machine, describe_machine
from vlmforge.deploy.records import Deployment, LauncherKind, log_path, pid_path, write_record
from vlmforge.errors import DeployError
from vlmforge.system.processes import ProcessIdentity, identify, pid_alive, same_process

log = logging.getLogger(__name__)


def first_host(hostfile: Path) -> str:
    """The first host an Open MPI hostfile names (rank 0 runs there, so MASTER_ADDR is it)."""
    for line in Path(hostfile).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            return line.split()[0]
    raise DeployError(f"{hostfile} names no host")


def launch_argv(engine_dir: Path, *, tp: int, host: str, port: int, model_name: str, pid_file: Path,
                hostfile: Path | None = None, gpus: bool = False, serve_args: Sequence[str] = (),
                master_port: int | None = None, env: dict[str, str] | None = None,
                python: str = sys.executable, rank0_only: Sequence[str] = (), instance: str | None = None) -> list[str]:
    """``mpirun -n TP ... python -m vlmforge serve ENGINE_DIR ...`` (the runner alone for TP 1 on one host).

    ``-x`` forwards the allow-listed names of ``env`` (default: this process's environment) to the ranks.
    ``rank0_only``: variables of the launcher's environment that only rank 0 keeps (the API key): rank 0 is then an
    application context of its own, to which alone they are forwarded with ``-x`` where a hostfile may put it on
    another host; the other ranks (the second context) inherit mpirun's environment on this host, so they drop
    them (``env -u NAME``) before the runner starts. ``instance``: the id rank 0 reports on /health.
    """
    serve = [python, "-m", "vlmforge", "serve", str(engine_dir), "--host", host, "--port", str(port),
             "--model-name", model_name, "--pid-file", str(pid_file),
             *(["--instance-id", instance] if instance is not None else []), *serve_args]
    if tp == 1 and hostfile is None:
        return serve
    env = dict(os.environ if env is None else env)
    master = first_host(hostfile) if hostfile else "127.0.0.1"
    options = ["--bind-to", "none"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        options.append("--allow-run-as-root")
    if not gpus:
        options.append("--oversubscribe")  # CPU ranks share the cores (each takes its share of threads)
    if hostfile:
        options += ["--hostfile", str(hostfile)]
    # -x applies to the application context it is given in: each context lists its own
    exports = ["-x", f"MASTER_ADDR={master}", "-x", f"MASTER_PORT={master_port or free_port()}"]
    for name in forwarded(env):
        exports += ["-x", name]
    if not rank0_only:
        return ["mpirun", "-n", str(tp), *options, *exports, *serve]
    rank0_exports = [part for name in rank0_only for part in ("-x", name)] if hostfile else []
    argv = ["mpirun", *options, "-n", "1", *exports, *rank0_exports, *serve]
    if tp > 1:
        drop = [part for name in rank0_only for part in ("-u", name)]
        argv += [":", "-n", str(tp - 1), *exports, "env", *drop, *serve]
    return argv


def _signal(identity: ProcessIdentity, signum: int) -> bool:
    """Send ``signum`` to the recorded process if it is still that process; whether it was sent. Through a pidfd
    where the kernel has them, so a pid recycled between the check and the signal is not hit."""
    try:
        fd = os.pidfd_open(identity.pid)
    except ProcessLookupError:
        return False
    except (AttributeError, OSError):
        fd = None
    try:
        if not same_process(identity):
            return False
        if fd is None:
            os.kill(identity.pid, signum)
        else:
            signal.pidfd_send_signal(fd, signum)
        return True
    except ProcessLookupError:
        return False
    finally:
        if fd is not None:
            os.close(fd)


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def gone(pid: int) -> str:
    """What stop says when the recorded pid now names another process."""
    now = identify(pid).cmdline
    what = f" ({' '.join(now)[:120]})" if now else ""
    return f"the recorded runner is gone; pid {pid} now belongs to another process{what}: nothing was signalled"


class ProcessLauncher:
    """Runners as processes of this host: mpirun and its ranks, or the runner alone."""

    kind = LauncherKind.PROCESS

    def __init__(self, python: str = sys.executable) -> None:
        self.python = python
        """The interpreter that runs ``-m vlmforge serve`` (on every host of a hostfile, at the same path)."""

    def machine(self) -> Machine:
        return describe_machine()

    def check(self, *, hostfile: Path | None) -> None:
        return None

    def command(self, request: LaunchRequest) -> tuple[list[str], dict[str, str]]:
        """The launcher's argv and the environment it starts with (this process's, allow-listed, and the key)."""
        mpi = request.tp > 1 or request.hostfile is not None
        env = launch_environment(os.environ, mpi=mpi, hostfile=request.hostfile is not None, api_key=request.api_key)
        argv = launch_argv(request.engine_dir, tp=request.tp, host=request.host, port=request.port,
                           model_name=request.build.model, pid_file=pid_path(request.state_dir, request.name),
                           hostfile=request.hostfile, gpus=request.gpus, serve_args=request.serve_args, env=env,
                           python=self.python, rank0_only=(API_KEY_ENV,) if request.api_key is not None else (),
                           instance=request.instance)
        return argv, env

    def start(self, request: LaunchRequest) -> Deployment:
        build, state_dir = request.build, request.state_dir
        state_dir.mkdir(parents=True, exist_ok=True)
        log_file, pid_file = log_path(state_dir, request.name), pid_path(state_dir, request.name)
        pid_file.unlink(missing_ok=True)
        argv, env = self.command(request)
        log.info("starting %s", " ".join(argv))
        with log_file.open("w") as out:
            proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        launcher = started_identity(proc, argv)
        endpoint = endpoint_url(request.host, request.port)
        try:
            wait_healthy(endpoint, request.wait_s, api_key=request.api_key,
                         instance=request.instance,
                         log_tail=lambda: f"({log_file})\n{tail(log_file)}",
                         died=lambda: None if proc.poll() is None else f"the runner exited with code {proc.returncode}")
        except BaseException:
            _kill_group(proc.pid)  # our child: its pid is not reused before we reap it
            raise
        deployment = Deployment(name=request.name, model=build.model, build_id=build.build_id,
                                engine_dir=request.engine_dir, endpoint=endpoint, host=request.host, port=request.port,
                                tp=request.tp, pid=proc.pid, pid_file=pid_file, log=log_file, argv=argv,
                                source=request.source, selection=request.selection, started_at=datetime.now(UTC),
                                launcher_process=launcher, rank0_process=_rank0(pid_file), auth=request.auth,
                                key_fingerprint=request.key_fingerprint, instance=request.instance)
        write_record(deployment, state_dir)
        deployment._proc = proc
        return deployment

    def running(self, deployment: Deployment) -> bool:
        return same_process(deployment.launcher_identity())

    def stop(self, deployment: Deployment, timeout: float) -> str:
        """SIGTERM to rank 0 (running requests finish, the other ranks are released), SIGKILL to the whole process
        group if the launcher is still there after ``timeout``; nothing if the recorded processes are gone."""
        launcher = deployment.launcher_identity()
        if not pid_alive(launcher.pid):
            return "was not running"
        if not same_process(launcher):
            return gone(launcher.pid)
        rank0 = deployment.rank0_identity()
        if not (rank0 is not None and _signal(rank0, signal.SIGTERM)) and not _signal(launcher, signal.SIGTERM):
            return "was not running"
        deadline = time.monotonic() + timeout
        while same_process(launcher) and time.monotonic() < deadline:
            time.sleep(0.1)
        if same_process(launcher):
            _kill_group(launcher.pid)
            return f"killed after {timeout:.0f}s without draining"
        return "drained and stopped"

    def logs(self, deployment: Deployment) -> str:
        return str(deployment.log)

    def discover(self) -> list[Deployment]:
        return []


def started_identity(proc: subprocess.Popen[Any], argv: list[str], wait_s: float = 5.0) -> ProcessIdentity:
    """The identity of a child just started with ``argv``. Popen returns when the child's exec has closed its
    close-on-exec pipe, which the kernel does before it lays out the new argv: read at once, ``/proc/PID/cmdline``
    can still be empty (seen on a loaded machine), and a record holding that made every later stop say the runner
    was gone. So wait until the kernel shows a command line; record ``argv`` itself if it shows none in time."""
    deadline = time.monotonic() + wait_s
    identity = identify(proc.pid)
    while not identity.cmdline and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
        identity = identify(proc.pid)
    return identity if identity.cmdline else identity.model_copy(update={"cmdline": list(argv)})


def _rank0(pid_file: Path) -> ProcessIdentity | None:
    """Rank 0's identity from the pid file it wrote (None where it runs on another host)."""
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    return identify(pid) if pid_alive(pid) else None
