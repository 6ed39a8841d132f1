"""The runner's API key, deploy side: refused without one where others can reach the runner (before anything is
asked, pulled or started), checked, and never kept in a plan or a record (a fingerprint is)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import SecretStr

from tests.helpers.deploy import BUILDS, H100x2, RecordingSource, UnaskedSource, cli, record
from tests.helpers.net import free_port
from vlmforge.deploy.auth import AuthMode, check_key, fingerprint, is_loopback, require_key
from vlmforge.deploy.service import plan_deploy, start_runner
from vlmforge.errors import DeployError

KEY = SecretStr("s3cret-" + "k" * 25)


@pytest.mark.parametrize(("host", "loopback"), [("127.0.0.1", True), ("127.1.2.3", True), ("::1", True),
                                                ("[::1]", True), ("localhost", True), ("0.0.0.0", False),
                                                ("", False), ("::", False), ("10.0.0.5", False),
                                                ("gpu-node-1", False)])
def test_loopback_is_only_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


@pytest.mark.parametrize("host", ["0.0.0.0", "10.0.0.5", "gpu-node-1"])
def test_a_reachable_runner_without_a_key_is_refused_before_anything(host: str, tmp_path: Path) -> None:
    with pytest.raises(DeployError, match=f"--host {host} lets other machines reach the runner") as caught:
        plan_deploy("llava-1.5-7b-hf#h100-tp1", UnaskedSource(BUILDS), host=host, port=free_port(), machine=H100x2,
                    state_dir=tmp_path / "state")
    assert "--api-key" in str(caught.value) and "VLMFORGE_API_KEY" in str(caught.value)
    assert not (tmp_path / "state").exists()


def test_a_runner_container_always_needs_a_key() -> None:
    with pytest.raises(DeployError, match="a runner container listens on its network's address"):
        require_key("127.0.0.1", None, container=True)
    assert require_key("127.0.0.1", KEY, container=True) is AuthMode.BEARER
    assert require_key("127.0.0.1", None) is AuthMode.NONE


@pytest.mark.parametrize(("key", "words"), [("short", "at least 16"), ("has a space in it ok?", "visible ASCII"),
                                            ("new\nline-in-the-key-x", "visible ASCII")])
def test_a_weak_or_unsendable_key_is_refused_without_echoing_it(key: str, words: str) -> None:
    with pytest.raises(DeployError, match=words) as caught:
        check_key(SecretStr(key))
    assert key not in str(caught.value)


def test_the_plan_keeps_a_fingerprint_and_start_wants_the_same_key(tmp_path: Path) -> None:
    source = RecordingSource(BUILDS)
    plan = plan_deploy("llava-1.5-7b-hf#h100-tp1", source, host="0.0.0.0", port=free_port(), machine=H100x2,
                       state_dir=tmp_path / "state", api_key=KEY)
    assert plan.auth is AuthMode.BEARER and plan.key_fingerprint == fingerprint(KEY)
    assert plan.key_fingerprint.startswith("sha256:") and len(plan.key_fingerprint) == len("sha256:") + 16
    assert KEY.get_secret_value() not in plan.model_dump_json()
    for other in (None, SecretStr("another-key-of-32-characters-xx")):
        with pytest.raises(DeployError, match="not the one its plan was checked with"):
            start_runner(plan, tmp_path / "engine", source="test", state_dir=tmp_path / "state", api_key=other)
    assert source.pulled == [] and not (tmp_path / "state").exists()


def test_the_cli_refuses_all_interfaces_without_a_key(tiny_engine: Path, tmp_path: Path) -> None:
    done = cli("deploy", "--engine-dir", str(tiny_engine), "--host", "0.0.0.0", "--port", str(free_port()),
               state=tmp_path, env={"VLMFORGE_API_KEY": ""})
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--host 0.0.0.0 lets other machines reach the runner" in done.stderr and "--api-key" in done.stderr
    docker = cli("deploy", "--engine-dir", str(tiny_engine), "--launcher", "docker", "--image", "vlmforge-x:none",
                 "--port", str(free_port()), state=tmp_path, env={"VLMFORGE_API_KEY": ""})
    assert docker.returncode == 2 and "a runner container listens on its network's address" in docker.stderr
    assert not list(tmp_path.iterdir())


def test_deployments_json_holds_no_key(tmp_path: Path) -> None:
    """A record written with a key (as the launchers write it) lists with its auth mode and fingerprint only."""
    record(tmp_path / "state", 0, auth="bearer", key_fingerprint=fingerprint(KEY))
    listed = json.loads(cli("deployments", "--json", state=tmp_path / "state").stdout)
    assert [(d["name"], d["auth"], d["key_fingerprint"], d["status"]) for d in listed] == [
        ("tiny", "bearer", fingerprint(KEY), "stopped")]
    assert KEY.get_secret_value() not in (tmp_path / "state" / "tiny.json").read_text()
