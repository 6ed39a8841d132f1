"""The Prefect flow `deploy-runner` against a real Prefect server: it starts a runner and leaves an artifact
with the endpoint, the engine id and TP."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import httpx
import pytest

from tests.helpers.net import free_port
from tests.helpers.runners import chat_body, image_url, runner_env

pytestmark = pytest.mark.skipif(importlib.util.find_spec("prefect") is None, reason="prefect is not installed")


def test_deploy_runner_flow_serves_and_leaves_its_artifacts(prefect_server: str, tiny_engine: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from vlmforge_flows.deploy import deploy_runner

    from vlmforge.deploy.service import read_deployment, stop_deployment

    for key, value in runner_env().items():
        monkeypatch.setenv(key, value)
    port = free_port()
    state = tmp_path / "state"
    state_flow = deploy_runner(engine_dir=str(tiny_engine), port=port, state_dir=str(state), return_state=True)
    summary = state_flow.result()
    deployment = read_deployment(state, summary["name"])
    assert deployment is not None
    try:
        assert summary["endpoint"] == f"http://127.0.0.1:{port}" and summary["tp"] == 1
        assert summary["engine"] == "tiny-llava#local"
        answer = httpx.post(f"{summary['endpoint']}/v1/chat/completions", timeout=60,
                            json=chat_body("hi", image_url(1), max_tokens=3))
        assert answer.status_code == 200
        flow_run_id = state_flow.state_details.flow_run_id
        with get_client(sync_client=True) as client:
            artifacts = client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
        by_key = {a.key: a for a in artifacts}
        assert set(by_key) == {f"deploy-tiny-llava-{port}", f"deploy-tiny-llava-{port}-report"}
        link = by_key[f"deploy-tiny-llava-{port}"].data
        assert link == f"[tiny-llava#local (TP 1)](http://127.0.0.1:{port}/v1/models)"
        report = by_key[f"deploy-tiny-llava-{port}-report"].data
        assert "| engine | `tiny-llava#local` |" in report and "| tensor parallel | 1 |" in report
        assert f"http://127.0.0.1:{port}/v1" in report and "## Why this build" in report
    finally:
        assert stop_deployment(deployment, state_dir=state) == "drained and stopped"
