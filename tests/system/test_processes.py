"""The one process-liveness helper: alive, zombie, and a recorded identity against pid reuse."""

from __future__ import annotations

import os
import subprocess
import sys

from vlmforge.system.processes import identify, pid_alive, same_process


def test_this_process_is_itself() -> None:
    me = identify()
    assert me.pid == os.getpid() and me.start_time is not None and me.cmdline
    assert pid_alive(me.pid) and same_process(me)


def test_an_exited_child_is_neither_alive_nor_the_same_process() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    recorded = identify(child.pid)
    assert same_process(recorded)
    child.kill()
    child.wait()
    assert not pid_alive(child.pid) and not same_process(recorded)


def test_a_zombie_is_not_alive() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped: a zombie
    try:
        assert not pid_alive(child.pid)
    finally:
        child.wait()


def test_a_recycled_pid_is_not_the_recorded_process() -> None:
    """Another process holding the recorded number (other start time or argv) must not be trusted or signalled."""
    me = identify()
    assert not same_process(me.model_copy(update={"start_time": (me.start_time or 0) + 1}))
    assert not same_process(me.model_copy(update={"cmdline": ["some", "other", "program"]}))
    assert not pid_alive(0) and not pid_alive(-1)
