"""The trtllm-serve launcher's container handling with a real Docker daemon: what it finds running, that it stops
only the recorded container while its labels and image still name the deployment, and that a container of the
deployment's name it did not start is never removed. NVIDIA's release image and a GPU are not here, so the
container is a labelled stand-in (the base image running ``sleep``): what runs inside is not what is tested."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.e2e.conftest import BASE_IMAGE, image_exists, run, tail
from vlmforge.deploy.launchers.container import LABEL, container_name, docker_client
from vlmforge.deploy.launchers.trtllm import TrtllmServeLauncher
from vlmforge.deploy.records import Deployment, ServeBackend
from vlmforge.errors import DeployError

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def base_image(docker_ready: None, tmp_path_factory: pytest.TempPathFactory) -> str:
    if not image_exists(BASE_IMAGE):
        if os.geteuid() != 0 or not shutil.which("debootstrap"):
            pytest.skip(f"no {BASE_IMAGE} and no way to make it here (infra/base-image.sh needs root and debootstrap)")
        log = tmp_path_factory.mktemp("base") / "base-image.log"
        done = run(["infra/base-image.sh", BASE_IMAGE], dict(os.environ), timeout=900, log=log)
        assert done.returncode == 0, f"infra/base-image.sh failed:\n{tail(log)}"
    return BASE_IMAGE


@pytest.fixture()
def stand_in(base_image: str, tmp_path: Path) -> Iterator[tuple[Deployment, object]]:
    """A container labelled as deployment ``trt-<pid>`` and its record, as the launcher leaves them."""
    client = docker_client()
    name = f"trt-{os.getpid()}"
    container = client.containers.run(base_image, ["sleep", "600"], name=container_name(name), detach=True,
                                      init=True, labels={LABEL: name})
    options = tmp_path / f"{name}.llm_api.yaml"
    options.write_text("max_batch_size: 1\n")
    record = Deployment(name=name, model="tiny", build_id="local", engine_dir=tmp_path, endpoint="http://127.0.0.1:1",
                        host="127.0.0.1", port=1, tp=1, pid=0, log=Path("docker logs"), argv=["sleep", "600"],
                        source="test", selection="test", started_at=datetime.now(UTC), container=container.id,
                        image=base_image, probe="http://127.0.0.1:1", backend=ServeBackend.TRTLLM_SERVE,
                        options_file=options)
    yield record, container
    subprocess.run(["docker", "rm", "-f", container.id], capture_output=True, check=False)


def test_only_the_recorded_container_is_stopped_while_it_still_names_the_deployment(stand_in: tuple) -> None:
    record, container = stand_in
    launcher = TrtllmServeLauncher()
    assert launcher.running(record)
    for other in (record.model_copy(update={"name": "someone-else"}), record.model_copy(update={"image": "x:1"})):
        assert "nothing was stopped" in launcher.stop(other, timeout=5)
        container.reload()
        assert container.status == "running" and not launcher.running(other)
    how = launcher.stop(record, timeout=5)
    assert how.startswith(("stopped", "killed")) and not record.options_file.exists()
    assert launcher.stop(record, timeout=5) == "was not running" and not launcher.running(record)


def test_a_container_of_the_name_that_is_not_the_deployments_is_left_alone(stand_in: tuple) -> None:
    record, container = stand_in
    with pytest.raises(DeployError, match="is running: `vlmforge undeploy"):
        TrtllmServeLauncher._clear_stale(docker_client(), container_name(record.name), record.name)
    with pytest.raises(DeployError, match="is not vlmforge's deployment other"):
        TrtllmServeLauncher._clear_stale(docker_client(), container_name(record.name), "other")
    container.reload()
    assert container.status == "running"


def test_deployments_and_undeploy_handle_a_trtllm_serve_deployment(stand_in: tuple, tmp_path: Path) -> None:
    from tests.helpers.deploy import cli
    from vlmforge.deploy.records import read_record, write_record

    record, container = stand_in
    state = tmp_path / "state"
    write_record(record, state)
    listed = cli("deployments", "--json", state=state)
    assert listed.returncode == 0, listed.stderr
    (shown,) = [d for d in json.loads(listed.stdout) if d["name"] == record.name]
    assert shown["backend"] == "trtllm-serve" and shown["status"] == "unhealthy"  # running; /health not answering
    stopped = cli("undeploy", record.name, "--timeout", "5", "--json", state=state)
    assert stopped.returncode == 0, stopped.stderr
    assert json.loads(stopped.stdout)["result"].startswith(("stopped", "killed"))
    assert read_record(state, record.name) is None and not record.options_file.exists()
    assert subprocess.run(["docker", "inspect", container.id], capture_output=True).returncode != 0
