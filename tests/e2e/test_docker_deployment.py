"""vlmforge's deployments on a real Prefect server, run by a real docker worker in the CPU image.

The path a user takes: infra/setup-pools.sh creates the pools and registers `build-engine-cpu` from
prefect.yaml, a docker worker runs the flow in vlmforge-cpu, the engine lands in an S3 store (moto),
and the run's state and artifacts are read back through the Prefect API. Then what goes wrong when
an input is bad: the failure must name what is missing.
"""

from __future__ import annotations

import socket
import sys
import time

import pytest

CPU_IMAGE = "vlmforge-cpu:local"  # the image of prefect.yaml's CPU deployments
MODEL = "tiny-llava"
DEPLOYMENT = "build-engine-cpu"
POOL = "vlmforge-cpu"
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@pytest.fixture(scope="module")
def deployed(prefect_server, s3_server):
    """Pools, the gpu limit, the store variable and the CPU build deployment, as setup-pools.sh makes them."""
    store = f"s3://{s3_server.bucket}/engines"
    result = prefect_server.run(["infra/setup-pools.sh", DEPLOYMENT], "setup-pools", VLMFORGE_STORE=store,
                                GPU_SLOTS="1", PREFECT=prefect_server.prefect, PYTHON=sys.executable,
                                **s3_server.env())
    assert result.returncode == 0, f"infra/setup-pools.sh failed:\n{prefect_server.log('setup-pools', 60)}"
    return prefect_server


def dead_endpoint() -> str:
    """An S3 endpoint URL on which nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def client(server):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    class Client:
        def __enter__(self):
            self._settings = temporary_settings({PREFECT_API_URL: server.api_url})
            self._settings.__enter__()
            self._client = get_client(sync_client=True)
            return self._client.__enter__()

        def __exit__(self, *exc):
            self._client.__exit__(*exc)
            self._settings.__exit__(*exc)

    return Client()


def start_run(server, parameters: dict, job_variables: dict | None = None, deployment: str = DEPLOYMENT):
    """A flow run of a deployment (build-engine-cpu), as `prefect deployment run` makes it."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    with client(server) as c:
        found = c.read_deployments(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment])))
        assert found, f"deployment {deployment} is not registered"
        return c.create_flow_run_from_deployment(found[0].id, parameters=parameters, job_variables=job_variables)


def work(server, name: str) -> str:
    """One pass of a docker worker over the CPU pool: it runs every run that is due, then exits."""
    name = f"worker-{name}"
    result = server.run([server.prefect, "worker", "start", "-p", POOL, "-t", "docker", "--run-once"],
                        name, timeout=900)
    assert result.returncode == 0, f"the docker worker failed:\n{server.log(name, 60)}"
    return name


def final_state(server, flow_run_id, timeout: float = 120):
    """The flow run once it is in a final state (the worker reports a crash just after exiting)."""
    deadline = time.monotonic() + timeout
    with client(server) as c:
        while True:
            flow_run = c.read_flow_run(flow_run_id)
            if flow_run.state and flow_run.state.type.value in FINAL or time.monotonic() > deadline:
                return flow_run
            time.sleep(1)


def run_logs(server, flow_run_id) -> str:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with client(server) as c:
        logs = c.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return "\n".join(log.message for log in logs)


def explain(server, flow_run, worker: str) -> str:
    return (f"flow run {flow_run.name}: {flow_run.state.type.value} {flow_run.state.message!r}\n"
            f"--- run logs\n{run_logs(server, flow_run.id)[-4000:]}\n--- worker\n{server.log(worker)}")


def job_variables(image: str, tmp_path) -> dict:
    """Run-level job variables: a model cache and work dir of this test's own (prefect.yaml's named
    volumes would carry state from run to run), and another image when VLMFORGE_TEST_IMAGE says so."""
    (tmp_path / "cache").mkdir()
    (tmp_path / "work").mkdir()
    variables = {"volumes": [f"{tmp_path / 'cache'}:/var/cache/vlmforge", f"{tmp_path / 'work'}:/var/lib/vlmforge/work"]}
    if image != CPU_IMAGE:
        variables["image"] = image
    return variables


@pytest.mark.docker
@pytest.mark.timeout(3600)
def test_build_engine_runs_in_the_cpu_image_and_publishes_to_s3(deployed, s3_server, cpu_image, tmp_path) -> None:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    store = f"s3://{s3_server.bucket}/engines"
    flow_run = start_run(deployed, {"model": MODEL, "store": store}, job_variables(cpu_image, tmp_path))
    worker_log = work(deployed, "build")

    flow_run = final_state(deployed, flow_run.id)
    assert flow_run.state.type.value == "COMPLETED", explain(deployed, flow_run, worker_log)

    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=s3_server.bucket).get("Contents", [])]
    # The store's layout (docs/store.md): one immutable manifest per build, then the alias moved to it.
    manifests = [k for k in keys if k.startswith(f"engines/models/{MODEL}/builds/") and k.endswith(".json")]
    assert manifests, f"no manifest of {MODEL} under {store}; the bucket holds {keys}"
    assert f"engines/models/{MODEL}/aliases/latest.json" in keys, keys

    with client(deployed) as c:
        artifacts = c.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id]))
        )
    assert artifacts, f"flow run {flow_run.name} has no artifacts"
    assert all(a.data for a in artifacts), [(a.key, a.type) for a in artifacts if not a.data]


@pytest.mark.docker
@pytest.mark.timeout(3600)
def test_bad_image_and_unreachable_store_fail_naming_them(deployed, s3_server, cpu_image, tmp_path) -> None:
    missing_image = "vlmforge-no-such-image:e2e"
    endpoint = dead_endpoint()
    store = f"s3://{s3_server.bucket}/unreachable"
    no_image = start_run(deployed, {"model": MODEL, "store": store}, {"image": missing_image})
    no_store = start_run(
        deployed, {"model": MODEL, "store": store},
        {**job_variables(cpu_image, tmp_path), "env": {"AWS_ENDPOINT_URL": endpoint}},
    )
    worker_log = work(deployed, "bad-inputs")

    crashed = final_state(deployed, no_image.id)
    assert crashed.state.type.value in {"CRASHED", "FAILED"}, explain(deployed, crashed, worker_log)
    assert "vlmforge-no-such-image" in (crashed.state.message or ""), explain(deployed, crashed, worker_log)

    failed = final_state(deployed, no_store.id)
    assert failed.state.type.value in {"FAILED", "CRASHED"}, explain(deployed, failed, worker_log)
    said = f"{failed.state.message}\n{run_logs(deployed, failed.id)}"
    assert endpoint.removeprefix("http://") in said or store in said, (
        f"the failure names neither the store {store} nor its endpoint {endpoint}:\n"
        + explain(deployed, failed, worker_log)
    )


@pytest.mark.timeout(600)
def test_deploying_to_a_pool_that_does_not_exist_names_the_pool(deployed) -> None:
    result = deployed.run([deployed.prefect, "--no-prompt", "deploy", "--name", DEPLOYMENT,
                           "--pool", "vlmforge-no-such-pool"], "deploy-wrong-pool")
    assert result.returncode != 0, deployed.log("deploy-wrong-pool")
    assert "vlmforge-no-such-pool" in result.stdout + result.stderr, deployed.log("deploy-wrong-pool")
