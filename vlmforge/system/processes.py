"""Processes on this host: is one alive, and is it still the one we recorded (pid reuse)?

A pid alone names a process only until it exits: the kernel hands the number to the next process. Whoever
records a pid to act on it later (a lock holder, a deployed runner, a build's scratch folder) records a
:class:`ProcessIdentity` instead (pid, the kernel's start time of that process, and its command line), and checks
it with :func:`same_process` before trusting or signalling it. This is the one liveness helper of the project.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict

PROC = Path("/proc")


class ProcessIdentity(BaseModel):
    """What names one process for its whole life on this host."""

    model_config = ConfigDict(frozen=True)

    pid: int
    start_time: int | None = None
    """Start time in clock ticks since boot (``/proc/PID/stat`` field 22); None where /proc is absent."""
    cmdline: list[str] | None = None
    """Its argv as the kernel reports it (``/proc/PID/cmdline``); None where unreadable."""


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of ``/proc/PID/stat`` after the command name (state is [0], start time is [19]); None if absent."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    _, sep, rest = text.rpartition(") ")  # the command name may itself hold ") "
    return rest.split() if sep else None


def start_time(pid: int) -> int | None:
    """The kernel's start time of process ``pid`` (clock ticks since boot), or None if unknown."""
    fields = _stat_fields(pid)
    try:
        return int(fields[19]) if fields else None
    except (IndexError, ValueError):
        return None


def cmdline(pid: int) -> list[str] | None:
    """The argv of process ``pid``, or None if it cannot be read."""
    try:
        raw = (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def identify(pid: int | None = None) -> ProcessIdentity:
    """The identity of process ``pid`` (default: this process)."""
    pid = os.getpid() if pid is None else pid
    return ProcessIdentity(pid=pid, start_time=start_time(pid), cmdline=cmdline(pid))


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists and is not a zombie (an exited child not yet reaped)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, owned by someone else
    fields = _stat_fields(pid)
    return not (fields and fields[0] == "Z")


def same_process(identity: ProcessIdentity) -> bool:
    """Whether the recorded process is still running: alive, and (where recorded) the same start time and argv.

    A recycled pid (another process now holds the number) is not the same process; neither is one whose start
    time cannot be read when one was recorded.
    """
    if not pid_alive(identity.pid):
        return False
    if identity.start_time is not None and start_time(identity.pid) != identity.start_time:
        return False
    if identity.cmdline is not None:
        now = cmdline(identity.pid)
        if now is not None and now != identity.cmdline:
            return False
    return True
