"""Deployment records: names become file names, so a name that is no deployment name is refused before anything
is read, written or started (`--name ../../x` once wrote outside the state directory and truncated a log)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.deploy import BUILDS, H100x2, UnaskedSource, cli, record
from tests.helpers.net import free_port
from vlmforge.deploy.records import read_record, recorded_names
from vlmforge.deploy.service import deploy, read_deployment, stop_deployment
from vlmforge.errors import DeployError

BAD = ["../x", "../../victim", "a/b", ".hidden", "", "-rf", "x" * 129, "tiny llava"]


@pytest.mark.parametrize("name", BAD)
def test_a_bad_name_is_refused_before_the_source_is_asked(name: str, tmp_path: Path) -> None:
    with pytest.raises(DeployError, match="invalid deployment name") as caught:
        deploy("llava-1.5-7b-hf#h100-tp1", UnaskedSource(BUILDS), name=name, port=free_port(), machine=H100x2,
               state_dir=tmp_path / "state", cache_dir=tmp_path / "cache")
    assert "pass another --name" in str(caught.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["../victim", "a/../../victim"])
def test_read_and_stop_refuse_a_name_that_leaves_the_state_dir(name: str, tmp_path: Path) -> None:
    record(tmp_path, 1)  # tmp_path/tiny.json: a record outside the state directory
    (tmp_path / "tiny.json").rename(tmp_path / "victim.json")
    with pytest.raises(DeployError, match="invalid deployment name"):
        read_deployment(tmp_path / "state", name)
    with pytest.raises(DeployError, match="invalid deployment name"):
        read_record(tmp_path / "state", name)
    assert (tmp_path / "victim.json").is_file()


def test_a_record_with_a_bad_name_is_not_read_or_listed(tmp_path: Path) -> None:
    state = tmp_path / "state"
    good = record(state, 1)
    data = json.loads((state / "tiny.json").read_text())
    (state / "odd.json").write_text(json.dumps({**data, "name": "../escape"}))
    (state / "not a name.json").write_text(json.dumps(data))
    assert read_record(state, "odd") is None
    assert recorded_names(state) == ["odd", "tiny"] and read_record(state, "tiny") == good
    assert stop_deployment(good, state_dir=state).startswith("the recorded runner is gone; pid 1 now belongs")
    assert not (state / "tiny.json").exists()


def test_the_cli_refuses_a_bad_name_and_touches_nothing(tiny_engine: Path, tmp_path: Path) -> None:
    state = tmp_path / "deep" / "state"
    victim = tmp_path / "victim.log"
    victim.write_text("someone's log\n")
    done = cli("deploy", "--engine-dir", str(tiny_engine), "--name", "../../victim", "--port", str(free_port()),
               state=state)
    assert done.returncode == 2 and "invalid deployment name '../../victim'" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert victim.read_text() == "someone's log\n" and not (tmp_path / "deep").exists()
    (tmp_path / "victim.json").write_text("{}")
    gone = cli("undeploy", "../../victim", state=state)
    assert gone.returncode == 2 and "invalid deployment name" in gone.stderr and (tmp_path / "victim.json").exists()
