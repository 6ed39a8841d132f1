"""prefect.yaml and the work pool templates, rendered as a worker renders them; no server, no Docker.

For the docker pools: the deployment's job variables over the pool's base job template
(DockerWorkerJobConfiguration.from_template_and_values, as the worker does), then the worker's
container settings, then docker-py's conversion into the Docker API's HostConfig. What is checked is
what the Docker daemon would receive.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
POOLS = REPO / "infra" / "pools"
CACHE = "/var/cache/vlmforge"
WORK = "/var/lib/vlmforge/work"
POOL_TEMPLATES = {"vlmforge-gpu": "docker-gpu.json", "vlmforge-cpu": "docker-cpu.json"}


def prefect_yaml() -> dict:
    return yaml.safe_load((REPO / "prefect.yaml").read_text())


def deployment(name: str) -> dict:
    found = [d for d in prefect_yaml()["deployments"] if d["name"] == name]
    assert len(found) == 1, f"prefect.yaml has {len(found)} deployments named {name}"
    return found[0]


def template(name: str) -> dict:
    return json.loads((POOLS / name).read_text())


def deploy_time(job_variables: dict, store: str = "s3://bucket/engines") -> dict:
    """Job variables as `prefect deploy` stores them: Prefect variables resolved."""
    text = json.dumps(job_variables).replace("{{ prefect.variables.vlmforge_store }}", store)
    assert "{{" not in text, f"unresolved template in job variables: {text}"
    return json.loads(text)


def render_docker(base_job_template: dict, values: dict):
    """The docker worker's job configuration. The client is only asked about blocks and Prefect
    variables, which these values do not use: a stand-in keeps Prefect from starting a server."""
    from prefect_docker.worker import DockerWorkerJobConfiguration

    return asyncio.run(
        DockerWorkerJobConfiguration.from_template_and_values(base_job_template, values, client=mock.AsyncMock())
    )


def docker_api_payload(deployment_name: str, run_job_variables: dict | None = None) -> tuple[object, dict]:
    """(job configuration, HostConfig) that the docker worker would send for a run of the deployment."""
    pytest.importorskip("prefect_docker", reason="prefect-docker is not installed")
    from docker.models.containers import _create_container_args
    from prefect_docker.worker import DockerWorker

    d = deployment(deployment_name)
    pool = d["work_pool"]["name"]
    values = {**deploy_time(d["work_pool"]["job_variables"]), **(run_job_variables or {})}
    config = render_docker(template(POOL_TEMPLATES[pool]), values)
    worker = DockerWorker(work_pool_name=pool)
    daemon = mock.MagicMock(**{"version.return_value": {"Version": "24.0.0"}})
    settings = worker._build_container_settings(daemon, config)
    create = _create_container_args({**settings, "version": "1.41"})  # raises on keys docker-py does not know
    return config, dict(create["host_config"])


def test_gpu_build_gets_every_gpu_shm_and_volumes() -> None:
    config, host = docker_api_payload("build-engine")
    assert config.image == "vlmforge-builder:local"
    assert host["DeviceRequests"] == [
        {"Driver": "nvidia", "Count": -1, "DeviceIDs": [], "Capabilities": [["gpu"]], "Options": {}}
    ]
    assert host["ShmSize"] == 16 * 1024**3
    assert host["Init"] is True
    assert host["AutoRemove"] is True
    assert {u["Name"]: u["Soft"] for u in host["Ulimits"]} == {"memlock": -1, "stack": 67108864}
    assert sorted(host["Binds"]) == sorted([f"vlmforge-cache:{CACHE}", f"vlmforge-work:{WORK}"])
    assert config.env["VLMFORGE_STORE"] == "s3://bucket/engines"
    assert (config.env["VLMFORGE_CACHE"], config.env["VLMFORGE_WORKDIR"]) == (CACHE, WORK)


def test_gpu_runner_runs_the_runner_image_with_gpus_and_the_docker_socket() -> None:
    config, host = docker_api_payload("deploy-runner")
    assert config.image == "vlmforge-runner:local"
    assert host["DeviceRequests"][0]["Capabilities"] == [["gpu"]]
    assert "/var/run/docker.sock:/var/run/docker.sock" in host["Binds"]


def test_cpu_build_has_no_gpu_and_the_same_volumes() -> None:
    config, host = docker_api_payload("build-engine-cpu")
    assert config.image == "vlmforge-cpu:local"
    assert "DeviceRequests" not in host
    assert host["ShmSize"] == 2 * 1024**3
    assert sorted(host["Binds"]) == sorted([f"vlmforge-cache:{CACHE}", f"vlmforge-work:{WORK}"])


def test_a_run_can_replace_the_image_and_keep_the_rest() -> None:
    config, host = docker_api_payload("build-engine", {"image": "registry.example/vlmforge-builder:1.2.0-abc"})
    assert config.image == "registry.example/vlmforge-builder:1.2.0-abc"
    assert host["DeviceRequests"][0]["Count"] == -1


def test_pool_env_and_deployment_env_merge() -> None:
    """Site settings in the pool (setup-pools.sh puts AWS_* there) reach the run with the store."""
    pytest.importorskip("prefect_docker", reason="prefect-docker is not installed")
    site = copy.deepcopy(template("docker-gpu.json"))
    site["variables"]["properties"]["env"]["default"]["AWS_ENDPOINT_URL"] = "http://s3:5000"
    values = deploy_time(deployment("build-engine")["work_pool"]["job_variables"])
    config = render_docker(site, values)
    assert config.env["AWS_ENDPOINT_URL"] == "http://s3:5000"
    assert config.env["VLMFORGE_STORE"] == "s3://bucket/engines"


def test_deployments_use_only_pools_that_have_templates_and_flows_of_the_contract() -> None:
    entrypoints = {
        "flows/build.py:build_engine", "flows/watch.py:watch_models",
        "flows/deploy.py:deploy_runner", "flows/gc.py:gc_store",
    }
    names = set()
    for d in prefect_yaml()["deployments"]:
        names.add(d["name"])
        assert d["entrypoint"] in entrypoints, d["name"]
        path, _, function = d["entrypoint"].partition(":")
        assert f"def {function}(" in (REPO / path).read_text(), f"{d['name']}: {d['entrypoint']} is not defined"
        assert d["work_pool"]["name"] in POOL_TEMPLATES, d["name"]
        image = d["work_pool"]["job_variables"]["image"]
        assert not image.endswith(":latest") and ":" in image, f"{d['name']}: {image} would be pulled on every run"
    assert {"build-engine", "watch-models", "deploy-runner", "gc-store"} <= names


def test_build_engine_runs_once_per_updated_model_and_nightly() -> None:
    d = deployment("build-engine")
    (trigger,) = d["triggers"]
    assert trigger["expect"] == ["vlmforge.model.updated"]
    assert trigger["match"] == {"prefect.resource.id": "vlmforge.model.*"}
    assert trigger["for_each"] == ["prefect.resource.id"]
    assert trigger["parameters"] == {"model": "{{ event.payload.model }}", "spec": "{{ event.payload.spec }}",
                                     "revision": "{{ event.payload.new_revision }}"}
    assert any(re.fullmatch(r"\d+ \d+ \* \* \*", s["cron"]) and s["parameters"].get("model") for s in d["schedules"])
    watch = deployment("watch-models")["schedules"]
    assert any(s.get("cron") and not s.get("parameters") for s in watch)
    # the nightly safety net announces every model still behind its source, announced before or not
    assert any(re.fullmatch(r"\d+ \d+ \* \* \*", s["cron"]) and s["parameters"] == {"reannounce_after_hours": 0}
               for s in watch)


def render_kubernetes(values: dict) -> dict:
    """The job manifest as prefect-kubernetes renders it: the variables' defaults that are not None,
    then the values; placeholders left without a value are dropped."""
    from prefect.utilities.templating import apply_values

    t = template("kubernetes-gpu.json")
    defaults = {k: v["default"] for k, v in t["variables"]["properties"].items() if v.get("default") is not None}
    return apply_values(t["job_configuration"], {**defaults, **values})["job_manifest"]


def test_kubernetes_job_asks_for_gpus_on_gpu_nodes_with_shm_and_cache() -> None:
    job = render_kubernetes({"image": "registry.example/vlmforge-builder:1.2.0", "gpu_count": 2})
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "registry.example/vlmforge-builder:1.2.0"
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 2}
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
    assert volumes[mounts[CACHE]]["persistentVolumeClaim"] == {"claimName": "vlmforge-cache"}
    assert WORK in mounts


@pytest.mark.parametrize("name", ["docker-gpu.json", "docker-cpu.json", "kubernetes-gpu.json"])
def test_every_template_variable_is_used_in_the_job_configuration(name: str) -> None:
    """Prefect drops variables that job_configuration does not reference (PrefectHQ/prefect#17588)."""
    t = template(name)
    used = set(re.findall(r"\{\{\s*([a-z_]+)\s*\}\}", json.dumps(t["job_configuration"])))
    assert set(t["variables"]["properties"]) - used == set()


def test_docker_templates_are_prefect_docker_defaults_plus_ours(tmp_path: Path) -> None:
    """infra/pools/generate.py over the installed prefect-docker's default gives the committed files."""
    pytest.importorskip("prefect_docker", reason="prefect-docker is not installed")
    from prefect_docker.worker import DockerWorker

    (tmp_path / "docker.json").write_text(json.dumps(DockerWorker.get_default_base_job_template()))
    subprocess.run([sys.executable, str(POOLS / "generate.py"), str(tmp_path / "docker.json"), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    for name in ("docker-gpu.json", "docker-cpu.json"):
        assert json.loads((tmp_path / name).read_text()) == template(name), (
            f"infra/pools/{name} differs from generate.py's output for this prefect-docker: regenerate it"
        )
