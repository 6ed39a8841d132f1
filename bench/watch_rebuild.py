"""Benchmark: from a source change to the new engine behind `latest`, for tiny-llava, on the real path.

A Prefect server, a moto S3 server (the s3:// source and the store), the build-engine deployment with
prefect.yaml's own trigger on a process pool, and a process worker, all started here. For each repeat, a
model (tiny-llava's spec, source s3://.../models/<name>) goes through:

  cold        the checkpoint is uploaded; the model was never built (nothing of it in the store or work dir)
  new-llm     new LLM weights (noise on every LLM tensor; the vision tensors byte-identical)
  new-vision  a whole new checkpoint (another seed: vision and LLM weights all new)
  unchanged   nothing changed: the watch run alone

Timed from the moment the upload has finished to the moment `MODEL@latest` in the store points to a
build of the new revision: the watch flow (run here, as the cron would), the event, the automation,
the worker picking the run up, the build, validation and publish. Reuse is read from the store and the
build's own stage table: bytes uploaded (files whose sha256 no earlier build had) against bytes reused,
and the stages skipped.

    PYTHONPATH=. python bench/watch_rebuild.py [--repeat 3] [--out bench-watch.json]

Production adds the cron interval of watch-models (30 min) and the worker's poll interval (Prefect's
default 10 s; 2 s here) in front of these numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
POOL = "bench-watch"
DEPLOYMENT = "build-engine-bench"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


@contextmanager
def process(argv: list[str], log: Path, env: dict[str, str], ready_url: str | None = None) -> Iterator[None]:
    with log.open("w") as out:
        proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        if ready_url:
            wait_http(ready_url, 120, proc)
        yield
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def prefect_cli(*args: str) -> None:
    result = subprocess.run([str(BIN / "prefect"), *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            check=False)
    if result.returncode:
        raise RuntimeError(f"prefect {' '.join(args)}: {result.stdout[-2000:]}{result.stderr[-2000:]}")


def deploy(tmp: Path, store: str, workdir: Path) -> Any:
    """build-engine with prefect.yaml's trigger, on a process pool running this checkout."""
    from prefect.client.orchestration import get_client

    project = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    build = next(d for d in project["deployments"] if d["name"] == "build-engine")
    bench_project = {
        "name": "vlmforge-bench", "prefect-version": project["prefect-version"], "build": None, "push": None,
        "pull": [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}],
        "deployments": [{"name": DEPLOYMENT, "entrypoint": build["entrypoint"],
                         "parameters": {"toolchain": "hf", "store": store, "workdir": str(workdir)},
                         "work_pool": {"name": POOL, "work_queue_name": "default"}, "triggers": build["triggers"]}],
    }
    path = tmp / "prefect.yaml"
    path.write_text(yaml.safe_dump(bench_project, sort_keys=False))
    prefect_cli("work-pool", "create", POOL, "--type", "process")
    prefect_cli("--no-prompt", "deploy", "--prefect-file", str(path), "--name", DEPLOYMENT)
    with get_client(sync_client=True) as client:
        return client.read_deployment_by_name(f"build-engine/{DEPLOYMENT}").id


def deployment_run(deployment_id: Any, model: str, revision: str) -> Any | None:
    """The deployment's run of ``model`` at ``revision`` if it has finished, else None (two models built from
    identical files have the same revision)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))
    found = [run for run in runs if run.parameters.get("revision") == revision and run.parameters.get("model") == model]
    return found[0] if found and found[0].state is not None and found[0].state.is_final() else None


def wait_for_run(deployment_id: Any, model: str, revision: str, timeout: float = 600) -> Any:
    deadline = time.monotonic() + timeout
    while (run := deployment_run(deployment_id, model, revision)) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no finished build for {revision}")
        time.sleep(0.5)
    return run


def stage_table(flow_run_id: Any, model: str) -> list[dict[str, Any]]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    key = f"build-{model}-stages"
    deadline = time.monotonic() + 30
    with get_client(sync_client=True) as client:
        while True:
            artifacts = client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
            table = next((a for a in artifacts if a.key == key), None)
            if table is not None:
                return json.loads(table.data)
            if time.monotonic() > deadline:
                raise RuntimeError(f"flow run {flow_run_id} has no artifact {key}: {[a.key for a in artifacts]}")
            time.sleep(1)


def measure(name: str, model: str, spec_path: Path, store: str, deployment_id: Any, change: Callable[[], None]) -> dict[str, Any]:
    """Apply ``change`` (edit and upload), then time watch -> event -> triggered build -> `latest` moved."""
    from vlmforge_flows.watch import watch_models

    from vlmforge.store import open_store

    with open_store(store) as opened:  # the blobs stored before: what a publish can reuse, from any model
        stored = {f.sha256 for summary in opened.list_models() for m in opened.manifests(summary.model) for f in m.files}
    change()
    start_wall, start = datetime.now(UTC), time.monotonic()
    (row,) = watch_models(models=[str(spec_path)], store=store)
    watch_s = time.monotonic() - start
    result: dict[str, Any] = {"scenario": name, "model": model, "status": row["status"], "watch_s": round(watch_s, 2)}
    if row["status"] != "announced":
        return result
    with open_store(store) as opened:
        while True:
            record = opened.get_alias(model, "latest")
            if record is not None:
                latest = opened.resolve(f"{model}@latest")
                if latest.source.revision == row["new_revision"]:
                    break
            finished = deployment_run(deployment_id, model, row["new_revision"])
            if finished is not None and not finished.state.is_completed():
                result.update(status=f"build {finished.state_name.lower()}: {finished.state.message}")
                return result  # e.g. validation failed: latest stays where it was
            if time.monotonic() - start > 900:
                raise TimeoutError(f"{model}@latest did not move to {row['new_revision']}")
            time.sleep(0.25)
    total = time.monotonic() - start
    run = wait_for_run(deployment_id, model, row["new_revision"])
    stages = stage_table(run.id, model)
    uploaded = sum(f.size for f in latest.files if f.sha256 not in stored)
    size = sum(f.size for f in latest.files)
    result.update({
        "change_to_latest_s": round(total, 2),
        "event_to_run_created_s": round((run.created - start_wall).total_seconds() - watch_s, 2),
        "run_created_to_started_s": round((run.start_time - run.created).total_seconds(), 2),
        "run_s": round((run.end_time - run.start_time).total_seconds(), 2),
        "stages": {s["stage"]: ("skipped" if s["status"].startswith("skipped") else s["seconds"]) for s in stages},
        "stages_skipped": [s["stage"] for s in stages if s["status"].startswith("skipped")],
        "stage_work_s": round(sum(s["seconds"] for s in stages if not s["status"].startswith("skipped")), 2),
        "engine_bytes": size, "uploaded_bytes": uploaded, "reused_bytes": size - uploaded,
        "build_id": latest.build_id,
    })
    return result


def run(repeat: int, keep: Path | None) -> dict[str, Any]:
    import boto3

    from tests.helpers.checkpoints import new_llm_weights, upload
    from vlmforge.families import get_family
    from vlmforge.specs.catalog import catalog_entry

    tmp = Path(tempfile.mkdtemp(prefix="bench-watch-", dir=keep))
    home, api_port, s3_port = tmp / "prefect-home", free_port(), free_port()
    home.mkdir()
    api, s3 = f"http://127.0.0.1:{api_port}/api", f"http://127.0.0.1:{s3_port}"
    os.environ.update({
        "PREFECT_HOME": str(home), "PREFECT_API_URL": api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false", "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": s3, "AWS_EC2_METADATA_DISABLED": "true",
        "HF_HUB_OFFLINE": "1", "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_WORKER_PREFETCH_SECONDS": "0",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    })
    os.environ.pop("VLMFORGE_WATCH", None)
    results: list[dict[str, Any]] = []
    with ExitStack() as stack:
        server_env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
        stack.enter_context(process([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                                     str(api_port), "--no-ui"], tmp / "server.log", server_env, f"{api}/health"))
        stack.enter_context(process([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(s3_port)], tmp / "moto.log",
                                    dict(os.environ), f"{s3}/moto-api/"))
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        boto3.client("s3").create_bucket(Bucket=bucket)
        store, workdir = f"s3://{bucket}/engines", tmp / "work"
        deployment_id = deploy(tmp, store, workdir)
        stack.enter_context(process([str(BIN / "prefect"), "worker", "start", "-p", POOL, "-t", "process"],
                                    tmp / "worker.log", dict(os.environ)))
        family = get_family("llava")
        for i in range(repeat):
            model = f"bench-llava-{i}"
            prefix = f"models/{model}"
            checkpoint = tmp / model
            spec = catalog_entry("tiny-llava")
            spec.update(name=model, source=f"s3://{bucket}/{prefix}")
            spec_path = tmp / f"{model}.yaml"
            spec_path.write_text(yaml.safe_dump(spec))

            def change(kind: str, checkpoint: Path = checkpoint, prefix: str = prefix, i: int = i) -> None:
                if kind == "cold":  # a seed of its own: nothing of it is in the store or the work dir yet
                    family.make_tiny(checkpoint, seed=i)
                elif kind == "new-llm":
                    new_llm_weights(checkpoint, family, seed=100 + i)
                elif kind == "new-vision":
                    shutil.rmtree(checkpoint)
                    family.make_tiny(checkpoint, seed=200 + i)
                else:
                    return
                upload(checkpoint, bucket, prefix)

            for name in ("cold", "new-llm", "new-vision", "unchanged"):
                result = measure(name, model, spec_path, store, deployment_id, partial(change, name))
                print(json.dumps(result), flush=True)
                results.append(result)
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=10)
        EventsWorker.drain_all(timeout=10)
    if keep is None:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"machine": machine(), "repeat": repeat, "results": results, "summary": summarize(results)}


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()}


def summarize(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for name in ("cold", "new-llm", "new-vision", "unchanged"):
        mine = [r for r in results if r["scenario"] == name and (name == "unchanged" or "change_to_latest_s" in r)]
        if not mine:
            continue
        row: dict[str, Any] = {"scenario": name, "n": len(mine), "watch_s": statistics.median(r["watch_s"] for r in mine)}
        if "change_to_latest_s" in mine[0]:
            for key in ("change_to_latest_s", "event_to_run_created_s", "run_created_to_started_s", "run_s",
                        "stage_work_s", "uploaded_bytes", "reused_bytes", "engine_bytes"):
                row[key] = statistics.median(r[key] for r in mine)
            row["stages_skipped"] = mine[0]["stages_skipped"]
            row["stages"] = mine[0]["stages"]
        rows.append(row)
    return rows


def print_table(summary: list[dict[str, Any]]) -> None:
    head = ("scenario", "change->latest s", "watch s", "event->run s", "run queued s", "run s", "stage work s",
            "uploaded B", "reused B", "stages skipped")
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for row in summary:
        if "change_to_latest_s" not in row:
            print(f"| {row['scenario']} | - | {row['watch_s']:.2f} | - | - | - | - | 0 | - | all (no build) |")
            continue
        print(f"| {row['scenario']} | {row['change_to_latest_s']:.1f} | {row['watch_s']:.2f} | "
              f"{row['event_to_run_created_s']:.1f} | {row['run_created_to_started_s']:.1f} | {row['run_s']:.1f} | "
              f"{row['stage_work_s']:.1f} | {int(row['uploaded_bytes']):,} | {int(row['reused_bytes']):,} | "
              f"{', '.join(row['stages_skipped']) or 'none'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="models to take through the four scenarios (medians)")
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    parser.add_argument("--keep", type=Path, help="keep the work dirs and logs under this directory")
    args = parser.parse_args()
    report = run(args.repeat, args.keep)
    print_table(report["summary"])
    for result in report["results"]:
        if result["status"] not in ("announced", "unchanged"):
            print(f"not published: {result['scenario']} of {result['model']}: {result['status']}")
    for row in report["summary"]:
        if "stages" in row:
            print(f"{row['scenario']}: " + ", ".join(f"{k} {v if v == 'skipped' else f'{v:.2f}s'}"
                                                     for k, v in row["stages"].items()))
    print(json.dumps(report["machine"]))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
