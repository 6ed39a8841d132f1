"""Watching an s3:// source end to end: a real Prefect server with the build-engine deployment and the
trigger from prefect.yaml, a process worker, and a real moto S3 server for the source and the store.

The story, in order: a model is built once from s3://; an unchanged source announces nothing and starts
no build; new LLM weights are announced, the trigger builds them, the new engine goes behind `latest`
(the visual engine reused); a new quantization of them reuses the download and the visual engine; broken
weights are announced, their build fails validation and `latest` stays where it was, with a failure
artifact, and the next watch does not announce them again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml

from tests.helpers.checkpoints import broken_llm_weights, new_llm_weights, upload
from tests.helpers.net import ROOT
from vlmforge.build.watch import EVENT, WATCH_ENV
from vlmforge.families import get_family
from vlmforge.sources import open_source
from vlmforge.specs.catalog import catalog_entry
from vlmforge.store import open_store

pytestmark = pytest.mark.slow
MODEL = "watched-llava"
POOL = "watch-test"
DEPLOYMENT = "build-engine-watch-test"


@dataclass
class World:
    bucket: str
    source_dir: Path
    source_uri: str
    store: str
    workdir: Path
    deployment_id: Any
    worker_log: Path
    first_build: str


def _prefect(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(Path(sys.executable).with_name("prefect")), *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _deploy_build_engine(tmp: Path, parameters: dict[str, Any], env: dict[str, str]) -> None:
    """`prefect deploy` of build-engine with prefect.yaml's own trigger, on a process pool, code from this checkout."""
    project = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    build = next(d for d in project["deployments"] if d["name"] == "build-engine")
    test_project = {
        "name": "vlmforge-watch-test", "prefect-version": project["prefect-version"], "build": None, "push": None,
        "pull": [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}],
        "deployments": [{"name": DEPLOYMENT, "entrypoint": build["entrypoint"], "parameters": parameters,
                         "work_pool": {"name": POOL, "work_queue_name": "default"}, "triggers": build["triggers"]}],
    }
    path = tmp / "prefect.yaml"
    path.write_text(yaml.safe_dump(test_project, sort_keys=False))
    _prefect("work-pool", "create", POOL, "--type", "process", env=env)
    _prefect("--no-prompt", "deploy", "--prefect-file", str(path), "--name", DEPLOYMENT, env=env)


@pytest.fixture(scope="module")
def world(prefect_server: str, aws_env: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("watch")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.delenv(WATCH_ENV, raising=False)
        bucket = f"w-{uuid.uuid4().hex[:10]}"
        boto3.client("s3").create_bucket(Bucket=bucket)
        source_dir = tmp / "checkpoint"
        get_family("llava").make_tiny(source_dir)
        upload(source_dir, bucket, f"models/{MODEL}")
        spec = catalog_entry("tiny-llava")
        spec.update(name=MODEL, source=f"s3://{bucket}/models/{MODEL}")
        spec_file = tmp / f"{MODEL}.yaml"
        spec_file.write_text(yaml.safe_dump(spec))
        store, workdir = f"s3://{bucket}/engines", tmp / "work"

        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "0"}
        _deploy_build_engine(tmp, {"toolchain": "hf", "store": store, "workdir": str(workdir)}, env)
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            deployment_id = client.read_deployment_by_name(f"build-engine/{DEPLOYMENT}").id
        worker_log = tmp / "worker.log"
        with worker_log.open("w") as log:
            worker = subprocess.Popen([str(Path(sys.executable).with_name("prefect")), "worker", "start", "-p", POOL,
                                       "-t", "process"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        try:
            from vlmforge_flows.build import build_engine

            first = build_engine(model=str(spec_file), store=store, workdir=str(workdir))
            assert first["created"] and first["aliases"] == {"latest": first["build_id"]}
            with open_store(store) as opened:
                opened.promote(f"{MODEL}#{first['build_id']}", "stable", expected=None)
            yield World(bucket, source_dir, spec["source"], store, workdir, deployment_id, worker_log, first["build_id"])
        finally:
            os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)


def _watch(world: World, **kwargs: Any) -> tuple[list[dict[str, Any]], Any]:
    """Run the watch flow here (every model of the store: the default list); (rows, flow run id)."""
    from vlmforge_flows.watch import watch_models

    state = watch_models(store=world.store, return_state=True, **kwargs)
    return state.result(), state.state_details.flow_run_id


def _task_names(flow_run_id: Any) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return [run.name for run in runs]


def _deployment_runs(world: World) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[world.deployment_id])))


def _wait_for_triggered_run(world: World, revision: str, timeout: float = 300) -> Any:
    """The deployment's run for ``revision`` once it is final (the trigger passes the revision as a parameter)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = [run for run in _deployment_runs(world) if run.parameters.get("revision") == revision]
        if runs and runs[0].state is not None and runs[0].state.is_final():
            return runs[0]
        time.sleep(1)
    raise AssertionError(f"no finished build for {revision} within {timeout}s; runs: "
                         f"{[(r.name, r.state_name, r.parameters.get('revision')) for r in _deployment_runs(world)]}; "
                         f"worker log: {world.worker_log.read_text()[-4000:]}")


def _model_events() -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    with get_client(sync_client=True) as client:
        page = client.read_events(filter=EventFilter(event=EventNameFilter(name=[EVENT]),
                                                     resource=EventResourceFilter(id=[f"vlmforge.model.{MODEL}"])), limit=50)
    return page.events


def _artifacts(flow_run_id: Any) -> dict[str, Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {artifact.key: artifact.data for artifact in found if artifact.key}


def test_an_unchanged_source_announces_nothing_and_builds_nothing(world: World) -> None:
    rows, run_id = _watch(world)
    (row,) = rows
    assert row["model"] == MODEL and row["status"] == "unchanged" and row["event_id"] is None
    assert row["old_revision"] == row["new_revision"] == open_source(world.source_uri).resolve_revision()
    names = _task_names(run_id)
    assert any(name.startswith("check-") for name in names)
    assert not any(name.startswith("announce-") for name in names)
    assert _deployment_runs(world) == []  # the next test checks that the one run it expects is the only one


def test_new_llm_weights_are_announced_built_by_the_trigger_and_put_behind_latest(world: World) -> None:
    with open_store(world.store) as store:
        before = store.resolve(f"{MODEL}@latest")
    new_llm_weights(world.source_dir, get_family("llava"), seed=1)
    changed_at = time.monotonic()
    upload(world.source_dir, world.bucket, f"models/{MODEL}")
    new_revision = open_source(world.source_uri).resolve_revision()
    assert new_revision != before.source.revision

    rows, _ = _watch(world)
    (row,) = rows
    assert (row["status"], row["old_revision"], row["new_revision"]) == ("announced", before.source.revision, new_revision)
    run = _wait_for_triggered_run(world, new_revision)
    seconds = time.monotonic() - changed_at
    assert run.state.is_completed(), f"{run.state}: {world.worker_log.read_text()[-4000:]}"
    assert run.parameters["model"] == MODEL and run.parameters["spec"]["source"] == world.source_uri
    assert [r.id for r in _deployment_runs(world)] == [run.id]  # one build, and none from the unchanged check
    (event,) = _model_events()  # only this change was announced
    assert str(event.id) == row["event_id"] and event.payload["new_revision"] == new_revision

    with open_store(world.store) as store:
        latest = store.resolve(f"{MODEL}@latest")
        stable = store.get_alias(MODEL, "stable")
    assert latest.build_id != before.build_id and latest.source.revision == new_revision
    assert latest.extra["expected_revision"] == new_revision
    assert stable is not None and stable.build_id == world.first_build  # stable moves only by promote
    # the visual engine was not rebuilt: its stage was skipped and its blob is the one already stored
    stages = {row["stage"]: row["status"] for row in json.loads(_artifacts(run.id)[f"build-{MODEL}-stages"])}
    assert stages["visual"].startswith("skipped") and stages["fetch"] == stages["llm"] == "done"
    files = lambda manifest: {f.path: f.sha256 for f in manifest.files}
    assert files(latest)["vision/model.onnx"] == files(before)["vision/model.onnx"]
    assert files(latest)["llm/model.safetensors"] != files(before)["llm/model.safetensors"]
    print(f"source change -> new engine behind latest: {seconds:.1f}s")

    again, _ = _watch(world)
    assert again[0]["status"] == "unchanged"


def test_a_new_quantization_reuses_the_download_and_the_visual_engine(world: World) -> None:
    """Stage by stage in the triggered build's work dir (whether int8 of these weights validates is another matter)."""
    from vlmforge.build.pipeline import HfPipeline
    from vlmforge.build.workdir import Workdir
    from vlmforge.specs.schema import spec_from_dict

    with open_store(world.store) as store:
        latest = store.resolve(f"{MODEL}@latest")
    int8 = spec_from_dict({**latest.spec, "quantization": {**latest.spec["quantization"], "method": "int8_wo"}})
    pipeline = HfPipeline(int8, Workdir(world.workdir))
    fetched = pipeline.fetch()
    converted = pipeline.convert(fetched)
    quantized = pipeline.quantize(converted)
    llm = pipeline.build_llm(converted, quantized)
    visual = pipeline.build_visual(fetched)
    assert fetched.skipped and converted.skipped and visual.skipped
    assert quantized is not None and not quantized.skipped and not llm.skipped
    assert llm.result["format"] == "lowbit"


def test_a_revision_that_fails_validation_leaves_latest_and_is_announced_once(world: World) -> None:
    with open_store(world.store) as store:
        before = store.resolve(f"{MODEL}@latest")
        builds = len(store.manifests(MODEL))
    broken_llm_weights(world.source_dir, get_family("llava"))
    upload(world.source_dir, world.bucket, f"models/{MODEL}")
    bad_revision = open_source(world.source_uri).resolve_revision()

    rows, _ = _watch(world)
    assert rows[0]["status"] == "announced" and rows[0]["new_revision"] == bad_revision
    run = _wait_for_triggered_run(world, bad_revision)
    assert run.state.is_failed()
    with open_store(world.store) as store:
        assert store.resolve(f"{MODEL}@latest").build_id == before.build_id
        assert len(store.manifests(MODEL)) == builds
    report = _artifacts(run.id)[f"build-{MODEL}"]
    assert "FAILED" in report and "ValidationFailed" in report and "no alias moved" in report

    rows, run_id = _watch(world)
    assert rows[0]["status"] == "already announced" and rows[0]["event_id"] == str(_model_events()[0].id)
    assert not any(name.startswith("announce-") for name in _task_names(run_id))
