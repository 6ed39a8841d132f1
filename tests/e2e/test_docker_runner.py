"""Runners as containers of their own (`vlmforge deploy --launcher docker`, prefect.yaml's deploy-runner-cpu):
started through a real Docker daemon from the host and from a flow run's own short-lived container (its API key
from a Prefect Secret block), serving from the published port, found and drained from the host. The key is in the
container's environment, never in its command line or its labels."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.e2e.test_docker_deployment import client, explain, final_state, start_run, work
from tests.helpers.net import free_port
from tests.helpers.runners import build_tiny_llava, chat_body, image_url

MODEL = "tiny-llava"
KEY = "e2e-runner-key-" + "w" * 24
BLOCK = "vlmforge-runner-api-key"
"""The Secret block prefect.yaml's deploy-runner deployments name."""


def vlmforge(*args: str, state: Path, timeout: float = 300, key: str | None = KEY) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "VLMFORGE_API_KEY"}
    if key is not None:
        env["VLMFORGE_API_KEY"] = key
    return subprocess.run([sys.executable, "-m", "vlmforge", *args, "--state-dir", str(state)], capture_output=True,
                          text=True, timeout=timeout, env=env, check=False)


def inspect(name: str) -> dict:
    out = subprocess.run(["docker", "inspect", f"vlmforge-{name}"], capture_output=True, text=True, check=True).stdout
    return json.loads(out)[0]


def containers(name: str) -> list[str]:
    out = subprocess.run(["docker", "ps", "-a", "--filter", f"name=^vlmforge-{name}$", "--format", "{{.Names}}"],
                         capture_output=True, text=True, check=True).stdout
    return out.split()


def ask(endpoint: str) -> dict:
    body = json.dumps(chat_body("What is this?", image_url(0), model=MODEL, max_tokens=4)).encode()
    request = urllib.request.Request(f"{endpoint}/v1/chat/completions", body,
                                     {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llava(tmp_path_factory.mktemp("work"))


@pytest.mark.docker
@pytest.mark.timeout(1200)
def test_a_runner_container_serves_is_found_from_anywhere_and_drains(cpu_image, engine, tmp_path) -> None:
    port = free_port()
    name = f"{MODEL}-{port}"
    started = vlmforge("deploy", "--engine-dir", str(engine), "--launcher", "docker", "--image", cpu_image,
                       "--port", str(port), "--no-warmup", "--json", state=tmp_path / "here")
    assert started.returncode == 0, started.stderr
    deployment = json.loads(started.stdout)
    try:
        assert deployment["container"] and deployment["image"] == cpu_image and deployment["status"] == "serving"
        assert deployment["auth"] == "bearer" and deployment["key_fingerprint"].startswith("sha256:")
        assert containers(name) == [f"vlmforge-{name}"]
        config = inspect(name)["Config"]
        assert f"VLMFORGE_API_KEY={KEY}" in config["Env"], "the key is not in the container's environment"
        assert KEY not in json.dumps(config["Labels"]) + json.dumps(config["Cmd"]) + started.stdout + started.stderr
        assert deployment["key_fingerprint"] in config["Labels"]["vlmforge.record"]
        answer = ask(deployment["endpoint"])
        assert answer["choices"][0]["finish_reason"] == "length" and answer["usage"]["completion_tokens"] == 4
        # another state directory (as after a flow run's container is gone): the daemon still knows the runner
        listed = json.loads(vlmforge("deployments", "--json", state=tmp_path / "elsewhere").stdout)
        assert [(d["name"], d["status"]) for d in listed] == [(name, "serving")]
        again = vlmforge("deploy", "--engine-dir", str(engine), "--launcher", "docker", "--image", cpu_image,
                         "--port", str(port), "--no-warmup", state=tmp_path / "elsewhere")
        assert again.returncode == 2 and f"deployment {name} is running" in again.stderr
        stopped = vlmforge("undeploy", name, "--json", state=tmp_path / "elsewhere")
        assert stopped.returncode == 0, stopped.stderr
        assert json.loads(stopped.stdout)["result"] == "drained and stopped"
        assert containers(name) == []
    finally:
        subprocess.run(["docker", "rm", "-f", f"vlmforge-{name}"], capture_output=True, check=False)


@pytest.mark.docker
@pytest.mark.timeout(600)
def test_a_missing_image_or_flag_is_refused_before_anything_starts(docker_ready, engine, tmp_path) -> None:
    port = free_port()
    keyless = vlmforge("deploy", "--engine-dir", str(engine), "--launcher", "docker", "--image", "vlmforge-no-such:e2e",
                       "--port", str(port), state=tmp_path, key=None)
    assert keyless.returncode == 2 and "needs an API key" in keyless.stderr and "VLMFORGE_API_KEY" in keyless.stderr
    missing = vlmforge("deploy", "--engine-dir", str(engine), "--launcher", "docker", "--image", "vlmforge-no-such:e2e",
                       "--port", str(port), state=tmp_path)
    assert missing.returncode == 2 and "vlmforge-no-such:e2e" in missing.stderr and "infra/build-images.sh" in missing.stderr
    no_image = vlmforge("deploy", "--engine-dir", str(engine), "--launcher", "docker", "--port", str(port), state=tmp_path)
    assert no_image.returncode == 2 and "--launcher docker needs --image" in no_image.stderr
    assert containers(f"{MODEL}-{port}") == []


@pytest.mark.docker
@pytest.mark.timeout(3600)
def test_deploy_runner_from_a_flow_container_leaves_a_runner_that_outlives_it(prefect_server, s3_server, cpu_image,
                                                                               engine, tmp_path, monkeypatch) -> None:
    """prefect.yaml's deploy-runner-cpu through a docker worker: the flow run pulls the build from the S3 store
    into the cache volume and starts the runner container (docker.sock), then its own container goes."""
    from vlmforge.artifacts.manifest import EngineManifest, SourceInfo
    from vlmforge.sources import hash_tree
    from vlmforge.store import open_store

    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    store = f"s3://{s3_server.bucket}/runner-e2e"
    config = json.loads((engine / "engine.json").read_text())
    manifest = EngineManifest(model=MODEL, build_id=f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-e2e00001", fingerprint="cd" * 32,
                              created_at=datetime.now(UTC), toolchain="hf", source=SourceInfo(uri="tiny://llava", revision="e2e"),
                              world_size=config["world_size"], files=tuple(f for f in hash_tree(engine) if f.path != "_stage.json"))
    with open_store(store) as opened:
        opened.publish(engine, manifest)
    deployed = prefect_server
    registered = deployed.run(["infra/setup-pools.sh", "deploy-runner-cpu"], "setup-runner", VLMFORGE_STORE=store,
                              GPU_SLOTS="1", PREFECT=deployed.prefect, PYTHON=sys.executable, **s3_server.env())
    assert registered.returncode == 0, deployed.log("setup-runner", 60)
    save = ("import os; from prefect.blocks.system import Secret; "
            f"Secret(value=os.environ['VLMFORGE_API_KEY']).save('{BLOCK}', overwrite=True)")
    secret = deployed.run([sys.executable, "-c", save],
                          "secret-block", VLMFORGE_API_KEY=KEY)
    assert secret.returncode == 0, deployed.log("secret-block")

    port = free_port()
    name = f"{MODEL}-{port}"
    (tmp_path / "cache").mkdir()
    volumes = [f"{tmp_path / 'cache'}:/var/cache/vlmforge"]
    job_variables = {"image": cpu_image, "volumes": [*volumes, "/var/run/docker.sock:/var/run/docker.sock"]}
    flow_run = start_run(deployed, {"model": MODEL, "store": store, "port": port, "image": cpu_image,
                                    "volumes": volumes, "wait_s": 300}, job_variables, deployment="deploy-runner-cpu")
    try:
        worker = work(deployed, "deploy-runner")
        flow_run = final_state(deployed, flow_run.id)
        assert flow_run.state.type.value == "COMPLETED", explain(deployed, flow_run, worker)
        assert containers(name) == [f"vlmforge-{name}"], "the runner container is not there after the flow run"
        answer = ask(f"http://127.0.0.1:{port}")
        assert answer["usage"]["completion_tokens"] == 4
        assert f"VLMFORGE_API_KEY={KEY}" in inspect(name)["Config"]["Env"]
        with client(deployed) as c:
            parameters = c.read_flow_run(flow_run.id).parameters
        assert parameters["api_key_secret"] == BLOCK and KEY not in json.dumps(parameters)
        listed = json.loads(vlmforge("deployments", "--json", state=tmp_path / "host").stdout)
        mine = [d for d in listed if d["name"] == name]
        assert mine and mine[0]["status"] == "serving" and mine[0]["build_id"] == manifest.build_id, listed
        stopped = vlmforge("undeploy", name, "--json", state=tmp_path / "host")
        assert stopped.returncode == 0 and json.loads(stopped.stdout)["result"] == "drained and stopped", stopped.stderr
    finally:
        subprocess.run(["docker", "rm", "-f", f"vlmforge-{name}"], capture_output=True, check=False)
