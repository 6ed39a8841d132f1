"""The identity a launcher records for the process it just started (regression: a stop said 'the recorded runner is
gone' for a runner that was running, because its command line had been read while the kernel was still laying it
out after exec, and the record held an empty one)."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest

from vlmforge.deploy.launchers import process
from vlmforge.system.processes import identify, same_process


@pytest.fixture
def child() -> Any:
    proc = subprocess.Popen(["sleep", "30"])
    yield proc
    proc.kill()
    proc.wait()


def test_a_command_line_read_mid_exec_is_not_recorded(child: subprocess.Popen[Any],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}

    def mid_exec(pid: int) -> Any:  # what /proc shows in the window after Popen returns: no argv yet
        calls["n"] += 1
        identity = identify(pid)
        return identity.model_copy(update={"cmdline": []}) if calls["n"] <= 3 else identity

    monkeypatch.setattr(process, "identify", mid_exec)
    recorded = process.started_identity(child, ["sleep", "30"])
    assert recorded.cmdline == ["sleep", "30"] and calls["n"] == 4
    assert same_process(recorded)  # what a later stop checks before it signals


def test_argv_is_recorded_when_the_kernel_never_shows_one(child: subprocess.Popen[Any],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(process, "identify", lambda pid: identify(pid).model_copy(update={"cmdline": None}))
    recorded = process.started_identity(child, ["sleep", "30"], wait_s=0.2)
    assert recorded.cmdline == ["sleep", "30"] and recorded.pid == child.pid
