"""The process launcher: what reaches each rank of a real mpirun (the API key to rank 0 alone, no secrets to any),
and stopping that checks process identity before any signal (a recorded pid the kernel gave to another process is
left alone)."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from tests.helpers.deploy import SERVE, record
from tests.helpers.net import free_port
from vlmforge.deploy.auth import API_KEY_ENV
from vlmforge.deploy.launchers.base import LaunchRequest, wait_healthy
from vlmforge.deploy.launchers.process import ProcessLauncher
from vlmforge.deploy.machine import BuildInfo
from vlmforge.deploy.service import plan_deploy, stop_deployment
from vlmforge.deploy.sources import LocalEngineSource
from vlmforge.errors import DeployError
from vlmforge.system.processes import ProcessIdentity, identify, pid_alive

KEY = "k3y-" + "x" * 28
SECRETS = {"AWS_ACCESS_KEY_ID": "AKIAEXAMPLE", "AWS_SECRET_ACCESS_KEY": "aws-secret", "AWS_SESSION_TOKEN": "tok",
           "HF_TOKEN": "hf_secret", "NCCL_IB_SECRET_KEY": "nccl-secret", "VLMFORGE_STORE": "s3://bucket/store",
           "GITHUB_TOKEN": "gh-secret"}
KNOBS = {"NCCL_DEBUG": "WARN", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "VLMFORGE_LOG_LEVEL": "DEBUG"}
BUILD = BuildInfo(model="tiny-llava", build_id="local", created_at=datetime(2026, 11, 1, tzinfo=UTC), toolchain="hf",
                  world_size=2)


def request(tmp_path: Path, tp: int, key: str | None) -> LaunchRequest:
    return LaunchRequest(build=BUILD.model_copy(update={"world_size": tp}), engine_dir=Path("/engines/tiny-llava"),
                         name="tiny", tp=tp, host="127.0.0.1", port=free_port(), state_dir=tmp_path / "state",
                         selection="test", source="test", api_key=SecretStr(key) if key else None)


@pytest.mark.parametrize("tp", [1, 3])
@pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun is not installed (apt-get install openmpi-bin)")
def test_the_key_reaches_rank_0_alone_and_no_secret_reaches_any_rank(tp: int, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The launcher's own argv and environment, run for real: each rank is a probe that writes what it got."""
    for name, value in {**SECRETS, **KNOBS}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv(API_KEY_ENV, "the-deployer's-own-key-not-the-one-given")
    probe = tmp_path / "probe"
    probe.write_text('#!/bin/sh\nenv -0 > "$0.rank${OMPI_COMM_WORLD_RANK:-0}"\n')
    probe.chmod(0o755)
    argv, env = ProcessLauncher(python=str(probe)).command(request(tmp_path, tp, KEY))
    assert not any(KEY in part for part in argv), "the key is on the command line"
    assert (argv[0] == "mpirun") == (tp > 1)
    subprocess.run(argv, env=env, check=True, timeout=120, capture_output=True)
    ranks = []
    for rank in range(tp):
        raw = Path(f"{probe}.rank{rank}").read_bytes().split(b"\0")
        ranks.append(dict(item.decode().split("=", 1) for item in raw if b"=" in item))
    assert ranks[0][API_KEY_ENV] == KEY
    for rank, got in enumerate(ranks):
        assert not set(SECRETS) & set(got), f"rank {rank} got {set(SECRETS) & set(got)}"
        assert all(got.get(name) == value for name, value in KNOBS.items()), rank
        if tp > 1:  # only -x gives these: each application context must have them
            assert got.get("MASTER_ADDR") == "127.0.0.1" and got.get("MASTER_PORT"), rank
        if rank:
            assert API_KEY_ENV not in got, f"rank {rank} got the key"


def test_without_a_key_the_launcher_passes_none_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(API_KEY_ENV, "a-key-in-the-deployer's-environment")
    argv, env = ProcessLauncher().command(request(tmp_path, 2, None))
    assert API_KEY_ENV not in env and "env" not in argv and argv[:3] == ["mpirun", "-n", "2"]


@pytest.fixture
def other() -> Iterator[subprocess.Popen]:
    """A process that is not a runner (it got a pid some runner once had)."""
    proc = subprocess.Popen(["sleep", "300"], start_new_session=True)
    yield proc
    proc.kill()
    proc.wait()


def runner_that_was(pid: int) -> ProcessIdentity:
    """The identity a runner had, whose pid is now ``pid``'s (started earlier, another command line)."""
    now = identify(pid)
    return ProcessIdentity(pid=pid, start_time=(now.start_time or 1000) - 500, cmdline=SERVE)


@pytest.mark.parametrize("recorded", ["identity", "argv only (an older record)"])
def test_undeploy_leaves_alone_a_process_that_now_holds_the_recorded_pid(recorded: str, other: subprocess.Popen,
                                                                         tmp_path: Path) -> None:
    fields = {"launcher_process": runner_that_was(other.pid)} if recorded == "identity" else {}
    deployment = record(tmp_path / "state", other.pid, **fields)
    how = stop_deployment(deployment, state_dir=tmp_path / "state", timeout=5)
    assert how.startswith(f"the recorded runner is gone; pid {other.pid} now belongs to another process")
    assert "nothing was signalled" in how
    time.sleep(0.2)
    assert other.poll() is None, "the other process was signalled"
    assert not (tmp_path / "state" / "tiny.json").exists(), "the stale record stays"


def test_a_recycled_rank_0_pid_is_not_signalled_the_launcher_is(other: subprocess.Popen, tmp_path: Path) -> None:
    launcher = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        deployment = record(tmp_path / "state", launcher.pid, launcher_process=identify(launcher.pid),
                            rank0_process=runner_that_was(other.pid))
        deployment.pid_file.write_text(f"{other.pid}\n")  # as the gone rank 0 left it
        assert stop_deployment(deployment, state_dir=tmp_path / "state", timeout=10) == "drained and stopped"
        assert launcher.wait(5) == -signal.SIGTERM
        assert other.poll() is None, "the process holding rank 0's old pid was signalled"
    finally:
        launcher.kill()
        launcher.wait()


def test_replace_does_not_stop_a_process_that_now_holds_the_recorded_pid(other: subprocess.Popen, tiny_engine: Path,
                                                                         tmp_path: Path) -> None:
    """`deploy --replace` (and plain deploy) see the recorded runner as gone: nothing to drain, nothing refused."""
    record(tmp_path / "state", other.pid, launcher_process=runner_that_was(other.pid), port=free_port())
    for replace in (True, False):
        plan = plan_deploy("", LocalEngineSource(tiny_engine), name="tiny", port=free_port(),
                           state_dir=tmp_path / "state", replace=replace)
        assert plan.replaces is None
    assert other.poll() is None and pid_alive(other.pid)


def test_the_recorded_identities_are_those_of_the_started_processes(tiny_engine: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A real runner (TP 1: the launcher is rank 0): its record names it by start time and command line."""
    from tests.helpers.runners import runner_env

    for name, value in runner_env().items():
        monkeypatch.setenv(name, value)
    launcher = ProcessLauncher()
    req = request(tmp_path, 1, None).model_copy(update={"engine_dir": tiny_engine, "wait_s": 180.0,
                                                        "serve_args": ["--decode", "dynamic"]})
    deployment = launcher.start(req)
    try:
        assert deployment.launcher_process == identify(deployment.pid) == deployment.rank0_process
        assert deployment.launcher_process.start_time is not None
        assert deployment.launcher_process.cmdline == deployment.argv and launcher.running(deployment)
        assert launcher.logs(deployment) == str(tmp_path / "state" / "tiny.log")
        health = httpx.get(f"{deployment.endpoint}/health").json()
        assert health["instance"] == deployment.instance == req.instance and "--instance-id" in deployment.argv
    finally:
        how = launcher.stop(deployment, timeout=60)
    assert how == "drained and stopped" and not launcher.running(deployment)
    assert deployment._proc is not None and deployment._proc.wait(5) == 0


def test_a_port_another_runner_took_after_the_check_is_refused_not_adopted(tiny_engine: Path, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Deploy checks the port when it plans, minutes before the start (the pull comes between). If another runner
    takes it meanwhile, the new one cannot listen, and the healthy answer on the port is the other runner's: the
    start is refused with that reason and nothing is recorded (it used to be recorded as healthy, pointing at the
    other runner, and the new runner's exit went unnoticed). Where health cannot name the runner (trtllm-serve's
    /health has no body), a healthy answer once the started process has died is refused too."""
    from tests.helpers.runners import runner_env, start_runner, stop_runner

    for name, value in runner_env().items():
        monkeypatch.setenv(name, value)
    other = start_runner(tiny_engine, tmp_path / "other.log")
    try:
        req = request(tmp_path, 1, None).model_copy(update={"engine_dir": tiny_engine, "port": other.port,
                                                            "wait_s": 180.0})
        with pytest.raises(DeployError, match=f"another runner answers on http://127.0.0.1:{other.port}"):
            ProcessLauncher().start(req)
        assert not (tmp_path / "state" / "tiny.json").exists()
        assert httpx.get(f"{other.url}/health").json()["status"] == "ok", "the other runner is left alone"
        polls = iter([None])
        with pytest.raises(DeployError, match="exited with code 2, yet .* answered healthy"):
            wait_healthy(other.url, 30, died=lambda: next(polls, "the runner exited with code 2"),
                         log_tail=lambda: "cannot listen")
    finally:
        stop_runner(other)


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(") ")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)


@pytest.mark.mpi
@pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun is not installed (apt-get install openmpi-bin)")
def test_a_tp2_runner_keeps_the_key_on_rank_0_and_serves_with_it(tiny_engine_tp2: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The real runner under `mpirun ... -n 1 serve : -n 1 env -u VLMFORGE_API_KEY serve`: one job of two ranks that
    serves, with the key in rank 0's environment alone, and drains on undeploy."""
    import httpx

    from tests.helpers.runners import chat_body, image_url, runner_env
    from vlmforge.deploy.service import deploy
    from vlmforge.deploy.sources import LocalEngineSource

    for name, value in {**runner_env(), **SECRETS}.items():
        monkeypatch.setenv(name, value)
    deployment = deploy("", LocalEngineSource(tiny_engine_tp2), port=free_port(), state_dir=tmp_path / "state",
                        api_key=SecretStr(KEY), serve_args=["--decode", "dynamic"], wait_s=240)
    try:
        assert deployment.argv[0] == "mpirun" and ":" in deployment.argv and KEY not in " ".join(deployment.argv)
        rank0 = deployment.rank0_process
        assert rank0 is not None and rank0.pid != deployment.pid
        ranks = [pid for pid in children(deployment.pid) if "serve" in (identify(pid).cmdline or [])]
        assert rank0.pid in ranks and len(ranks) == 2, ranks
        envs = {pid: environ(pid) for pid in ranks}
        assert envs[rank0.pid][API_KEY_ENV] == KEY
        assert [API_KEY_ENV in env for pid, env in envs.items() if pid != rank0.pid] == [False]
        assert not [name for env in envs.values() for name in env if name in SECRETS]
        health = httpx.get(f"{deployment.endpoint}/health", headers={"Authorization": f"Bearer {KEY}"}).json()
        assert health["tensor_parallel"] == 2
        answer = httpx.post(f"{deployment.endpoint}/v1/chat/completions", timeout=120,
                            headers={"Authorization": f"Bearer {KEY}"},
                            json=chat_body("What is this?", image_url(0), max_tokens=6))
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] >= 1
        refused = httpx.get(f"{deployment.endpoint}/v1/models", timeout=30)  # the runner took the key it was given
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{deployment.endpoint}/health", timeout=30).status_code == 200  # open, for probes
    finally:
        how = stop_deployment(deployment, state_dir=tmp_path / "state", timeout=90)
    assert how == "drained and stopped" and deployment._proc is not None and deployment._proc.wait(10) == 0
