"""The trtllm pipeline's stages with the TensorRT-LLM runtime replaced by a labelled test double
(tests/helpers/trtllm.py); the plan, the work dir, the validation comparison and the manifest are real."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.trtllm import PLACEHOLDER, TrtllmStandIn
from vlmforge.build.trtllm_pipeline import TrtllmPipeline
from vlmforge.build.workdir import Workdir
from vlmforge.errors import ToolchainUnavailable, ValidationFailed
from vlmforge.families import resolve
from vlmforge.specs.catalog import load_model_or_spec
from vlmforge.toolchains.trtllm.stages import NO_LOGITS, GoldenComparison, judge

pytestmark = pytest.mark.container  # runs inside NVIDIA's TensorRT-LLM 1.2 image: CI runs it again there


@pytest.fixture
def on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The plan's fetch step runs `vlmforge fetch` (this checkout's CLI), offline."""
    import os
    import sys

    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_without_tensorrt_llm_the_pipeline_refuses_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(ToolchainUnavailable, match="TensorRT-LLM is not installed here"):
        TrtllmPipeline(load_model_or_spec("tiny-llava"), Workdir(tmp_path))
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(("model", "overrides", "words"), [
    ("tiny-llava", {"dialect": "0.9"}, "executes dialect 1.2 plans"),
])
def test_what_it_cannot_finish_is_refused_before_tensorrt_llm_is_asked(tmp_path: Path, model: str, overrides: dict,
                                                                      words: str) -> None:
    runtime = TrtllmStandIn()
    with pytest.raises(ToolchainUnavailable, match=words):
        TrtllmPipeline(load_model_or_spec(model, overrides), Workdir(tmp_path), runtime=runtime)
    assert runtime.executed == []


def test_vila_has_a_reference_now_and_is_not_refused(tmp_path: Path) -> None:
    """VILA is validated against vlmforge's own transformers-module assembly (issue 14): no refusal before work."""
    runtime = TrtllmStandIn()
    pipeline = TrtllmPipeline(load_model_or_spec("vila-7B"), Workdir(tmp_path), runtime=runtime)
    assert pipeline.resolved.family.name == "vila" and runtime.executed == []


@pytest.mark.slow
def test_stages_build_validate_and_describe_the_engine(tmp_path: Path, on_path: None) -> None:
    events: list[str] = []
    runtime = TrtllmStandIn()
    pipeline = TrtllmPipeline(load_model_or_spec("tiny-llava"), Workdir(tmp_path), runtime=runtime, on_event=events.append)
    run, engine, validation = pipeline.run()
    assert runtime.executed == [step.name for step in pipeline.plan.steps]
    assert run.source_revision.startswith("tiny-sha256:")
    files = {f.path for f in engine.record.files}
    assert {"engine.json", f"llm/{PLACEHOLDER}", f"vision/{PLACEHOLDER}"} <= files
    assert any(path.startswith("processor/") for path in files)
    report = validation.result
    assert report["passed"] and report["token_agreement"] == 1.0
    assert report["max_logit_error"] is None and report["logit_check"] == NO_LOGITS
    manifest = pipeline.manifest(run, engine, validation, extra={"expected_revision": run.source_revision})
    assert manifest.toolchain == "trtllm" and manifest.fingerprint == engine.record.fingerprint
    assert manifest.source.revision == run.source_revision and manifest.validation["logit_check"] == NO_LOGITS
    assert manifest.extra["expected_revision"] == run.source_revision
    assert manifest.extra["build_key"] == pipeline.build_key(run.source_revision)  # what the published check computes
    assert set(manifest.extra) == {"expected_revision", "build_key", "checkpoint"}  # + checkpoint's read-back report
    assert manifest.extra["checkpoint"]["verification"]["readback_vs_quantized"]["max_error"] >= 0
    rerun = TrtllmStandIn()
    again = TrtllmPipeline(load_model_or_spec("tiny-llava"), Workdir(tmp_path), runtime=rerun)
    run2, engine2, validation2 = again.run()
    assert all(step.skipped for step in run2.steps if step.step.outputs)
    assert engine2.skipped and validation2.skipped and engine2.record.fingerprint == engine.record.fingerprint


@pytest.mark.slow
def test_an_engine_that_disagrees_fails_validation(tmp_path: Path, on_path: None) -> None:
    pipeline = TrtllmPipeline(load_model_or_spec("tiny-llava"), Workdir(tmp_path),
                              runtime=TrtllmStandIn(corrupt_engine=True))
    with pytest.raises(ValidationFailed, match="TensorRT engine token agreement .* nothing is published"):
        pipeline.run()


def _golden(agreement: float, error: float | None) -> GoldenComparison:
    return GoldenComparison(prompt="p", reference_tokens=[1, 2], engine_tokens=[1, 2], agreement=agreement,
                            max_logit_error=error, engine_text="t")


def test_logits_where_returned_are_judged_by_max_logit_error() -> None:
    resolved = resolve(load_model_or_spec("tiny-llava", {"validation.max_logit_error": 0.5}))
    assert judge(resolved, [_golden(1.0, 0.25)], [1.0]).logit_check == "compared"
    with pytest.raises(ValidationFailed, match=r"max logit error 0.7500 \(allowed <= 0.5\)"):
        judge(resolved, [_golden(1.0, 0.25), _golden(1.0, 0.75)], [1.0, 1.0])
    assert judge(resolved, [_golden(1.0, None)], [1.0]).max_logit_error is None  # not measured: tokens decide
    with pytest.raises(ValidationFailed, match="need >= "):
        judge(resolved, [_golden(0.5, None)], [1.0])
