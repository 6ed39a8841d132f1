"""The `gc-store` flow (prefect.yaml's weekly dry run) on a real Prefect server and a local store: a dry run
deletes nothing and says what would go; apply deletes it; both leave their report and table."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.helpers.store import make_engine, new_manifest, standard_files

pytestmark = pytest.mark.skipif(importlib.util.find_spec("prefect") is None, reason="prefect is not installed")


def test_gc_flow_reports_then_deletes(prefect_server: str, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from vlmforge_flows.gc import gc_store

    from vlmforge.store import open_store

    url = str(tmp_path / "store")
    with open_store(url) as store:
        ids = [store.publish(make_engine(tmp_path / f"e{i}", standard_files(f"s{i}")),
                             new_manifest("qwen2-vl-2b", minutes=i, seed=f"s{i}")).manifest.build_id for i in range(3)]
    dry = gc_store(keep=1, store=url, return_state=True)
    report = dry.result()
    assert not report["applied"] and [b["build_id"] for b in report["deleted"]] == ids[:2][::-1]
    with open_store(url) as store:
        assert len(store.manifests("qwen2-vl-2b")) == 3
    applied = gc_store(keep=1, apply=True, store=url, return_state=True).result()
    assert applied["applied"] and len(applied["deleted"]) == 2
    with open_store(url) as store:
        assert [m.build_id for m in store.manifests("qwen2-vl-2b")] == [ids[2]]
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[dry.state_details.flow_run_id])))
    by_key = {a.key: a for a in artifacts}
    assert set(by_key) == {"gc-store", "gc-store-builds"}
    assert "Would delete (dry run): 2 builds" in by_key["gc-store"].data


def test_gc_flow_refuses_to_apply_while_a_manifest_is_unreadable(prefect_server: str, tmp_path: Path) -> None:
    from vlmforge_flows.gc import gc_markdown, gc_store

    from vlmforge.store import GcReport, open_store
    from vlmforge.store.base import build_key

    url = str(tmp_path / "store")
    with open_store(url) as store:
        ids = [store.publish(make_engine(tmp_path / f"e{i}", standard_files(f"u{i}")),
                             new_manifest("qwen2-vl-2b", minutes=i, seed=f"u{i}")).manifest.build_id for i in range(2)]
    key = build_key("qwen2-vl-2b", ids[0])
    (tmp_path / "store" / key).write_text('{"schema_version": 2}')
    report = GcReport.model_validate(gc_store(keep=1, store=url, grace_minutes=0))
    assert report.refused_manifests == [key] and report.refusal
    assert "apply refuses while records are unreadable" in gc_markdown(report, url)
    state = gc_store(keep=1, apply=True, store=url, grace_minutes=0, return_state=True)
    assert state.is_failed() and "gc refused" in str(state.result(raise_on_failure=False))
    assert (tmp_path / "store" / key).exists()
