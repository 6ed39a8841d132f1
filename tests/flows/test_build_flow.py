"""The build flow end to end on the hf toolchain, through a real Prefect server and a real store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vlmforge.errors import SourceError, ValidationFailed
from tests.helpers.tiny import HF_FAMILIES
from vlmforge.families import get_family
from vlmforge.specs.catalog import catalog_specs
from vlmforge.store import open_store

pytestmark = pytest.mark.slow
TINY = [spec.name for spec in catalog_specs() if spec.source in {get_family(n).tiny_source for n in HF_FAMILIES}]
"""The catalog entry of every hf family's (first) tiny model, from the registry: a new family is built here too."""


@pytest.fixture
def build(prefect_server: str, hf_offline: None, tmp_path: Path):
    from vlmforge_flows.build import build_engine

    def run(model: str, *, workdir: Path | None = None, store: Path | None = None, **overrides):
        return build_engine(model=model, workdir=str(workdir or tmp_path / "work"), store=str(store or tmp_path / "store"),
                            overrides=overrides or None)

    return run


@pytest.mark.parametrize("model", TINY)
def test_each_tiny_family_builds_validates_and_publishes(build, tmp_path: Path, model: str) -> None:
    summary = build(model)
    assert summary["created"] and summary["aliases"] == {"latest": summary["build_id"]}
    assert summary["validation"]["token_agreement"] >= 0.8
    with open_store(str(tmp_path / "store")) as store:
        manifest = store.resolve(f"{model}@latest")
        pulled = tmp_path / "pulled"
        store.pull(f"{model}@latest", pulled)
    assert manifest.source.revision.startswith("tiny-sha256:")
    assert manifest.validation["passed"] is True and manifest.toolchain == "hf"
    assert {"engine.json", "vision/model.onnx"} <= {f.path for f in manifest.files}
    if manifest.spec["family"] in {"llava_next", "llava_onevision"}:  # the newline embedding travels with the visual
        # engine (1.2's name)
        assert "vision/image_newlines.safetensors" in {f.path for f in manifest.files}
        assert (pulled / "vision" / "image_newlines.safetensors").is_file()
    if manifest.spec["family"] in {"qwen2_vl", "qwen2_5_vl"}:  # the host's rope table: the tower's frequencies
        assert (pulled / "vision" / "vision_rope.safetensors").is_file()
    written = json.loads((pulled / "engine.json").read_text())
    assert written["family"] == get_family(manifest.spec["family"]).name
    # artifacts.hf_checkpoint is off by default: the engine directory, its record and the spec are as before it
    assert not any(f.path.startswith("hf/") for f in manifest.files) and not (pulled / "hf").exists()
    assert "hf_checkpoint" not in written and "hf_checkpoint" not in manifest.extra
    assert "artifacts" not in manifest.spec


def test_hf_checkpoint_publishes_the_whole_model_folder_reusing_every_stage_up_to_the_engine(
        build, tmp_path: Path) -> None:
    off = build("tiny-llava")
    on = build("tiny-llava", **{"artifacts.hf_checkpoint": True})
    assert on["created"] and on["build_id"] != off["build_id"]
    work = tmp_path / "work" / "tiny-llava"
    count = {stage: len(list(work.glob(f"{stage}-*"))) for stage in ("convert", "llm", "visual", "engine")}
    assert count == {"convert": 1, "llm": 1, "visual": 1, "engine": 2}  # only the engine stage is redone
    with open_store(str(tmp_path / "store")) as store:
        manifest = store.resolve(f"tiny-llava#{on['build_id']}")
        pulled = tmp_path / "pulled"
        store.pull(manifest.ref, pulled)
        plain = store.resolve(f"tiny-llava#{off['build_id']}")
    assert manifest.spec["artifacts"] == {"hf_checkpoint": True} and manifest.fingerprint != plain.fingerprint
    assert "hf/config.json" in {f.path for f in manifest.files}
    written = json.loads((pulled / "engine.json").read_text())
    architecture = json.loads((pulled / "hf" / "config.json").read_text())["architectures"][0]  # the whole model
    assert written["hf_checkpoint"] == manifest.extra["hf_checkpoint"] == {
        "path": "hf", "architecture": architecture, "dtype": manifest.spec["dtype"]}
    rest = {f.path: f.sha256 for f in manifest.files if not f.path.startswith("hf/") and f.path != "engine.json"}
    assert rest == {f.path: f.sha256 for f in plain.files if f.path != "engine.json"}  # hf/ added, nothing else


def test_a_rerun_is_a_no_op_and_leaves_ui_artifacts(prefect_server: str, hf_offline: None, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from vlmforge_flows.build import build_engine

    def run():  # type: ignore[no-untyped-def]
        return build_engine(model="tiny-llava", workdir=str(tmp_path / "work"), store=str(tmp_path / "store"),
                            return_state=True)

    first = run().result()
    state = run()
    again = state.result()
    assert again["build_id"] == first["build_id"] and again["created"] is False
    assert set(again["stages"].values()) == {"skipped"}
    with get_client(sync_client=True) as client:  # this run's artifacts (the server is shared by the session)
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    by_key = {artifact.key: artifact for artifact in artifacts}
    assert {"build-tiny-llava", "build-tiny-llava-stages", "build-tiny-llava-manifest"} <= set(by_key)
    assert f"models/tiny-llava/builds/{first['build_id']}.json" in str(by_key["build-tiny-llava-manifest"].data)


@pytest.mark.parametrize("toolchain", ["hf", "trtllm"])
def test_aliases_reach_the_store_on_both_toolchains(prefect_server: str, hf_offline: None, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch, toolchain: str) -> None:
    """`vlmforge build --toolchain trtllm --alias prod` once published only `latest` (the trtllm branch did its own
    publishing, without the flow's aliases or the retrying task). Both toolchains go through the same flow code:
    hf builds for real; trtllm swaps only the TensorRT-LLM runtime for the labelled test double of
    tests/helpers/trtllm.py (TensorRT-LLM cannot run here). The Prefect server, the flow, its tasks (the retrying
    publish task included) and the store are real."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from vlmforge.build import trtllm_pipeline
    from vlmforge_flows.build import build_engine

    if toolchain == "trtllm":
        from tests.helpers.trtllm import TrtllmStandIn

        monkeypatch.setattr(trtllm_pipeline, "default_runtime", TrtllmStandIn)  # TEST DOUBLE: TensorRT-LLM only
        monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")  # its fetch step
    store_dir = tmp_path / "store"
    state = build_engine(model="tiny-llava", toolchain=toolchain, workdir=str(tmp_path / "work"), store=str(store_dir),
                         aliases=["prod", "canary"], return_state=True)
    summary = state.result()
    build_id = summary["build_id"]
    assert summary["toolchain"] == toolchain and summary["aliases"] == {"prod": build_id, "canary": build_id}
    with open_store(str(store_dir)) as store:
        assert store.resolve("tiny-llava@prod").build_id == build_id
        assert store.resolve("tiny-llava@canary").build_id == build_id
        assert store.get_alias("tiny-llava", "latest") is None  # only the aliases asked for move
        manifest = store.resolve("tiny-llava@prod")
    assert manifest.toolchain == toolchain and manifest.validation["passed"] is True
    assert {"engine.json", "processor/tokenizer.json"} <= {f.path for f in manifest.files}
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    names = {run.name.rsplit("-", 1)[0] for run in task_runs}
    assert "publish" in names and {"assemble-engine", "validate"} <= names
    if toolchain == "trtllm":
        assert "run-trtllm-plan" in names
        assert manifest.validation["max_logit_error"] is None and "not measured" in manifest.validation["logit_check"]
        assert any(f.path.startswith("llm/TEST-DOUBLE") for f in manifest.files)


def test_int8_is_smaller_and_still_passes(build, tmp_path: Path) -> None:
    summary = build("tiny-llava", **{"quantization.method": "int8_wo"})
    quantize = next((tmp_path / "work" / "tiny-llava").glob("quantize-*"))
    result = json.loads((quantize / "_stage.json").read_text())["result"]
    assert result["bytes_after"] < result["bytes_before"] and result["format"] == "lowbit"
    assert summary["validation"]["token_agreement"] >= 0.8
    with open_store(str(tmp_path / "store")) as store:  # the quantize stage's figures travel with the build
        manifest = store.resolve(f"tiny-llava#{summary['build_id']}")
    assert manifest.extra["quantization"]["quantized_vs_reference"] == result["quantized_vs_reference"]
    assert "hf_checkpoint" not in manifest.extra and not any(f.path.startswith("hf/") for f in manifest.files)


def test_an_impossible_threshold_fails_and_publishes_nothing(build, tmp_path: Path) -> None:
    with pytest.raises(ValidationFailed, match="nothing is published"):
        build("tiny-nougat", **{"validation.min_token_agreement": 1.0, "validation.max_logit_error": 0.0})
    with open_store(str(tmp_path / "store")) as store:
        assert store.list_builds() == []


def test_a_validation_threshold_change_reruns_the_flow_at_most_once(build, tmp_path: Path) -> None:
    """A spec change touching only validation thresholds reran the whole flow on every later build: the published
    check looked for the build key of the new thresholds, while publishing kept the stored build of the same engine
    fingerprint (thresholds only gate publishing), whose key holds the old ones. Now the stored build answers for the
    new thresholds when its recorded figures meet them; a threshold it does not meet is the flow's to refuse."""
    from vlmforge.build.published import find_published
    from vlmforge.specs.catalog import load_model_or_spec
    from vlmforge.specs.schema import Toolchain

    def published(**overrides: object):  # type: ignore[no-untyped-def]
        spec = load_model_or_spec("tiny-llava", overrides)
        return find_published(spec, Toolchain.HF, store_url=str(tmp_path / "store"), workdir=tmp_path / "work")

    first = build("tiny-llava")
    stricter = {"validation.min_token_agreement": 0.95}
    assert first["validation"]["token_agreement"] >= 0.95  # the published engine meets the stricter threshold
    again = build("tiny-llava", **stricter)  # e.g. a run started before this fix, or --force: the engine is reused
    assert again["build_id"] == first["build_id"] and again["created"] is False
    assert again["stages"]["engine"] == "skipped" and again["stages"]["validate"] != "skipped"
    found = published(**stricter)  # the next identical build is a no-op again (it never was before the fix)
    assert found is not None and found.manifest.build_id == first["build_id"]
    assert published(**{"validation.max_logit_error": 0.5}) is not None  # a looser one too, without any flow run
    error = first["validation"]["max_logit_error"]
    if error > 0:  # a threshold the recorded figures miss: not published, the flow must validate (and refuse)
        assert published(**{"validation.max_logit_error": error / 2}) is None
    assert published(**{"validation.max_new_tokens": 4}) is None  # changes what validation measures: a new build


def test_a_corrupted_source_file_is_detected(build, tmp_path: Path) -> None:
    source = tmp_path / "checkpoint"
    get_family("llava").make_tiny(source)
    weights = next(source.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-100])
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"name: broken-llava\nfamily: llava\nsource: file://{source}\ndtype: float16\n"
                    "limits: {max_batch_size: 1, max_input_len: 128, max_output_len: 32}\n"
                    "architecture: {num_visual_features: 16}\n")
    with pytest.raises(SourceError, match=f"corrupt weights {weights.name}"):
        build(str(spec))
    with open_store(str(tmp_path / "store")) as store:
        assert store.list_builds() == []


def test_secrets_stay_out_of_manifests(build, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token_value_123")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret-value-456")
    build("tiny-llava")
    texts = [p.read_text(errors="ignore") for p in (tmp_path / "store").rglob("*.json")]
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        texts += [str(artifact.data) for artifact in client.read_artifacts()]
    assert texts and not any("hf_secret_token_value_123" in t or "aws-secret-value-456" in t for t in texts)


def _cli(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vlmforge", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _identity(store_dir: Path, model: str) -> dict:
    with open_store(str(store_dir)) as store:
        manifest = store.resolve(f"{model}@latest")
    validation = {k: v for k, v in manifest.validation.items() if not k.endswith("_ms")}
    return {"fingerprint": manifest.fingerprint, "files": manifest.files, "source": manifest.source,
            "spec": manifest.spec, "validation": validation}


def test_a_build_killed_mid_stage_resumes_and_publishes_the_same_engine(prefect_server: str, tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PREFECT_API_URL": prefect_server}
    model, work, store = "tiny-blip2-t5", tmp_path / "work", tmp_path / "store"
    proc = _cli(["build", model, "--workdir", str(work), "--store", str(store), "--json"], env)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not list((work / model).glob(".visual-*.partial-*")):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    with open_store(str(store)) as opened:
        assert opened.list_builds() == []  # nothing half-published
    rerun = _cli(["build", model, "--workdir", str(work), "--store", str(store), "--json"], env)
    out, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err[-3000:]
    stages = json.loads(out)["stages"]
    assert stages["fetch"] == "skipped" and stages["visual"] != "skipped"
    clean = _cli(["build", model, "--workdir", str(tmp_path / "work2"), "--store", str(tmp_path / "store2"), "--json"], env)
    out, err = clean.communicate(timeout=600)
    assert clean.returncode == 0, err[-3000:]
    assert _identity(store, model) == _identity(tmp_path / "store2", model)
