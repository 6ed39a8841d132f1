"""The Prefect flow `deploy-runner` against a real Prefect server: it starts a runner with the API key of a Prefect
Secret block and leaves an artifact with the endpoint, the engine id and TP; the key is never a flow parameter, a
task input, a log line, an artifact or part of the record."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import httpx
import pytest

from tests.helpers.net import free_port
from tests.helpers.runners import chat_body, image_url, runner_env

pytestmark = pytest.mark.skipif(importlib.util.find_spec("prefect") is None, reason="prefect is not installed")

KEY = "flow-secret-key-" + "q" * 24
BLOCK = "test-runner-api-key"


def test_deploy_runner_flow_serves_and_leaves_its_artifacts(prefect_server: str, tiny_engine: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.blocks.system import Secret
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterFlowRunId,
    )
    from pydantic import SecretStr
    from vlmforge_flows.deploy import deploy_runner

    from vlmforge.deploy.auth import fingerprint
    from vlmforge.deploy.service import read_deployment, stop_deployment

    for key, value in runner_env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("VLMFORGE_API_KEY", raising=False)
    Secret(value=KEY).save(BLOCK, overwrite=True)
    port = free_port()
    state = tmp_path / "state"
    state_flow = deploy_runner(engine_dir=str(tiny_engine), port=port, state_dir=str(state), api_key_secret=BLOCK,
                               return_state=True)
    summary = state_flow.result()
    deployment = read_deployment(state, summary["name"])
    assert deployment is not None
    try:
        assert summary["endpoint"] == f"http://127.0.0.1:{port}" and summary["tp"] == 1
        assert summary["engine"] == "tiny-llava#local"
        assert summary["auth"] == "bearer" and summary["key_fingerprint"] == fingerprint(SecretStr(KEY))
        environ = Path(f"/proc/{deployment.rank0_pid()}/environ").read_bytes().split(b"\0")
        assert f"VLMFORGE_API_KEY={KEY}".encode() in environ
        answer = httpx.post(f"{summary['endpoint']}/v1/chat/completions", timeout=60,
                            headers={"Authorization": f"Bearer {KEY}"},
                            json=chat_body("hi", image_url(1), max_tokens=3))
        assert answer.status_code == 200
        flow_run_id = state_flow.state_details.flow_run_id
        with get_client(sync_client=True) as client:
            artifacts = client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
            flow_runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        by_key = {a.key: a for a in artifacts}
        assert set(by_key) == {f"deploy-tiny-llava-{port}", f"deploy-tiny-llava-{port}-report"}
        link = by_key[f"deploy-tiny-llava-{port}"].data
        assert link == f"[tiny-llava#local (TP 1)](http://127.0.0.1:{port}/v1/models)"
        report = by_key[f"deploy-tiny-llava-{port}-report"].data
        assert "| engine | `tiny-llava#local` |" in report and "| tensor parallel | 1 |" in report
        assert f"http://127.0.0.1:{port}/v1" in report and "## Why this build" in report
        assert f"| authentication | bearer (key `{fingerprint(SecretStr(KEY))}`) |" in report
        assert flow_runs[0].parameters["api_key_secret"] == BLOCK and len(task_runs) == 3 and logs
        seen = [*(a.model_dump_json() for a in artifacts), *(r.model_dump_json() for r in [*flow_runs, *task_runs]),
                *(entry.message for entry in logs), (state / f"{summary['name']}.json").read_text()]
        assert not [text for text in seen if KEY in text], "the key reached the API or the record"
    finally:
        assert stop_deployment(deployment, state_dir=state) == "drained and stopped"


def test_a_missing_secret_block_is_named_before_anything_starts(prefect_server: str, tiny_engine: Path,
                                                                tmp_path: Path) -> None:
    from vlmforge_flows.deploy import deploy_runner

    state = deploy_runner(engine_dir=str(tiny_engine), port=free_port(), state_dir=str(tmp_path / "state"),
                          api_key_secret="no-such-block", return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match="no Prefect Secret block 'no-such-block'"):
        state.result()
    assert not (tmp_path / "state").exists()


def test_prefect_yaml_runners_take_their_key_from_a_secret_block() -> None:
    """The shipped deploy-runner deployments listen on all interfaces: each names the Secret block, and no parameter
    or job variable of any deployment carries a key."""
    import inspect

    import yaml
    from vlmforge_flows.deploy import deploy_runner

    from tests.helpers.net import ROOT

    project = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    runners = [d for d in project["deployments"] if d["entrypoint"] == "flows/deploy.py:deploy_runner"]
    assert {d["name"] for d in runners} == {"deploy-runner", "deploy-runner-cpu"}
    for deployment in runners:
        assert deployment["parameters"]["host"] == "0.0.0.0"
        assert deployment["parameters"]["api_key_secret"] == "vlmforge-runner-api-key"
    for deployment in project["deployments"]:
        settings = {**deployment.get("parameters", {}), **deployment["work_pool"]["job_variables"].get("env", {})}
        assert not [k for k in settings if "KEY" in k.upper() and k != "api_key_secret"], deployment["name"]
    assert [p for p in inspect.signature(deploy_runner.fn).parameters if "key" in p] == ["api_key_secret"]


def test_deploy_runner_flow_tells_a_process_runner_the_store_it_pulled_from(prefect_server: str, tiny_engine: Path,
                                                                          tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Deployed from a store by the flow (not only by the CLI), a process runner gets ``--tune-store`` with that store
    (made absolute), so it loads the build's tune artifact instead of compiling every start."""
    from vlmforge_flows.deploy import deploy_runner

    from tests.helpers.deploy import publish_tiny_engine
    from vlmforge.deploy.service import read_deployment, stop_deployment

    for key, value in runner_env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("VLMFORGE_API_KEY", raising=False)
    monkeypatch.chdir(tmp_path)
    ref = publish_tiny_engine(tiny_engine, "store")
    state = tmp_path / "state"
    summary = deploy_runner(model="tiny-llava", store="store", port=free_port(), state_dir=str(state),
                            cache_dir=str(tmp_path / "cache"), warmup=False)
    deployment = read_deployment(state, summary["name"])
    assert deployment is not None
    try:
        assert summary["engine"] == ref
        argv = deployment.argv
        assert argv[argv.index("--tune-store") + 1] == str(tmp_path / "store")
    finally:
        assert stop_deployment(deployment, state_dir=state) == "drained and stopped"
