"""The build flow: one engine through either toolchain's core pipeline, validated, then published.

hf: download, convert, quantize, build the LLM and visual engines (the visual branch beside the LLM branch),
assemble, validate. trtllm: resolve the source revision, run the TensorRT-LLM plan's steps (holding the `gpu`
concurrency slots), assemble, validate. Both publish through the same retrying publish task with the flow's
aliases; every stage is skipped when its inputs' fingerprint is unchanged (and the run log says so); a markdown
report and tables show in the Prefect UI.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.runtime import flow_run

from vlmforge_tasks import build as t
from vlmforge.build.pipeline import HfPipeline, default_workdir
from vlmforge.build.reports import build_report_markdown, failure_markdown, stage_rows, step_rows
from vlmforge.build.trtllm_pipeline import PlanRun, TrtllmPipeline
from vlmforge.build.workdir import StageOutcome, Workdir
from vlmforge.errors import SpecError
from vlmforge.sources import FetchedSource
from vlmforge.specs.catalog import load_model_or_spec
from vlmforge.specs.schema import BuildSpec, Toolchain, merge_overrides, spec_from_dict
from vlmforge.store.base import build_key


VALIDATION_SUMMARY = ("token_agreement", "max_logit_error", "vision_ms", "llm_ms", "e2e_ms")
"""The validation figures the flow returns (the CLI prints them); None where a toolchain cannot measure one."""


def manifest_url(store_url: str, model: str, build_id: str) -> str:
    """Where the store keeps a build's manifest, as a URL a person can open or copy."""
    return f"{store_url.rstrip('/')}/{build_key(model, build_id)}"


def _artifact_key(name: str) -> str:
    return "build-" + "".join(ch if ch.isalnum() else "-" for ch in name.lower())


def _expected_revision(logger: Any, name: str, expected: str | None, got: str) -> dict[str, Any]:
    """The manifest's record of the revision the caller expected; a source that moved on since is logged."""
    if expected is None:
        return {}
    if got != expected:
        logger.warning("%s: expected source revision %s but the source is at %s (it moved on since): building what "
                       "was fetched", name, expected, got)
    return {"expected_revision": expected}


def _load_spec(model: str, spec: dict[str, Any] | None, overrides: dict[str, Any]) -> BuildSpec:
    """The spec given whole (by the watch event) or the catalog entry / spec file ``model`` names."""
    if spec is None:
        return load_model_or_spec(model, overrides)
    loaded = spec_from_dict(merge_overrides(spec, overrides), origin=f"the spec parameter of {model}")
    if loaded.name != model:
        raise SpecError(f"the spec parameter is for {loaded.name!r}, not {model!r}", path="name")
    return loaded


def _build_hf(pipeline: HfPipeline, revision: str | None, stages: list[StageOutcome], progress: Any,
              logger: Any) -> tuple[StageOutcome, StageOutcome, Any]:
    """The hf stages as tasks: (engine, validation, manifest)."""
    fetched = t.fetch(pipeline)
    stages.append(fetched)
    extra = _expected_revision(logger, pipeline.model, revision, FetchedSource.model_validate(fetched.result).revision)
    update_progress_artifact(progress, 15.0)
    visual_future = t.build_visual.submit(pipeline, fetched)  # the visual branch runs beside the LLM branch
    converted = t.convert(pipeline, fetched)
    quantized = t.quantize(pipeline, converted)
    llm = t.build_llm(pipeline, converted, quantized)
    visual = visual_future.result()
    stages += [converted, *([quantized] if quantized else []), llm, visual]
    if quantized is not None:  # calibration set and digest, the quantized LLM against the float32 one
        extra["quantization"] = quantized.result
    update_progress_artifact(progress, 60.0)
    engine = t.assemble(pipeline, visual, llm, converted, quantized)
    stages.append(engine)
    validation = t.validate(pipeline, engine, fetched)
    stages.append(validation)
    return engine, validation, pipeline.manifest(fetched, engine, validation, extra=extra)


def _build_trtllm(pipeline: TrtllmPipeline, revision: str | None, stages: list[StageOutcome], progress: Any,
                  logger: Any, runs: list[PlanRun]) -> tuple[StageOutcome, StageOutcome, Any]:
    """The trtllm stages as tasks: (engine, validation, manifest)."""
    source_revision = t.trtllm_revision(pipeline)
    extra = _expected_revision(logger, pipeline.model, revision, source_revision)
    update_progress_artifact(progress, 5.0)
    run = t.run_trtllm_plan(pipeline, source_revision)
    runs.append(run)
    update_progress_artifact(progress, 60.0)
    engine = t.assemble_trtllm(pipeline, run)
    stages.append(engine)
    validation = t.validate_trtllm(pipeline, engine)
    stages.append(validation)
    return engine, validation, pipeline.manifest(run, engine, validation, extra=extra)


@flow(name="build-engine", flow_run_name="build-{model}-{toolchain}", validate_parameters=True)
def build_engine(model: str, toolchain: str = "hf", store: str | None = None, workdir: str | None = None,
                 overrides: dict[str, Any] | None = None, aliases: list[str] | None = None,
                 spec: dict[str, Any] | None = None, revision: str | None = None) -> dict[str, Any]:
    """Build one engine from a catalog name or spec file, validate it and publish it to the store.

    ``spec``: the whole spec (the watch event sends the one it checked), instead of loading ``model``.
    ``revision``: the source revision the caller expects (the event's new revision). The build builds what
    it fetches; when the source has moved on since, it says so in the log and records both in the manifest.
    ``aliases``: moved to the new build once it validated (default: latest), on either toolchain.
    """
    logger = get_run_logger()
    build_spec = _load_spec(model, spec, overrides or {})
    chosen = Toolchain(toolchain)
    work = Workdir(Path(workdir) if workdir else default_workdir())
    key = _artifact_key(build_spec.name)
    # Both refuse here, before any work: what the toolchain cannot build, TensorRT-LLM missing.
    pipeline: HfPipeline | TrtllmPipeline = (TrtllmPipeline(build_spec, work, on_event=lambda line: None)
                                             if chosen is Toolchain.TRTLLM else
                                             HfPipeline(build_spec, work, on_event=lambda line: None))
    progress = create_progress_artifact(0.0, description=f"{build_spec.name}: build stages done")
    stages: list[StageOutcome] = []
    runs: list[PlanRun] = []
    try:
        if isinstance(pipeline, TrtllmPipeline):
            engine, validation, manifest = _build_trtllm(pipeline, revision, stages, progress, logger, runs)
        else:
            engine, validation, manifest = _build_hf(pipeline, revision, stages, progress, logger)
        update_progress_artifact(progress, 85.0)
        links = {"prefect_flow_run": flow_run.ui_url} if flow_run.ui_url else {}
        manifest = manifest.model_copy(update={"links": links})
        published = t.publish(store, engine, manifest, tuple(aliases or ("latest",)))
        update_progress_artifact(progress, 100.0)
    except Exception as exc:
        create_markdown_artifact(failure_markdown(build_spec, stages, exc), key=key, description=f"{build_spec.name}: build failed")
        raise
    finally:
        if runs:
            create_table_artifact(step_rows(runs[0].steps), key=f"{key}-steps",
                                  description=f"{build_spec.name}: TensorRT-LLM plan steps")
    if isinstance(pipeline, TrtllmPipeline):
        pipeline.remove_checkpoints()
    create_markdown_artifact(build_report_markdown(build_spec, pipeline.resolved.derived, stages, published), key=key,
                             description=f"{build_spec.name}: build report")
    create_table_artifact(stage_rows(stages), key=f"{key}-stages", description=f"{build_spec.name}: stages")
    create_link_artifact(manifest_url(published.store_url, published.manifest.model, published.manifest.build_id),
                         link_text=f"{published.manifest.model}#{published.manifest.build_id}",
                         key=f"{key}-manifest", description=f"{build_spec.name}: the published manifest")
    steps = {f"plan.{r.step.name}": ("skipped" if r.skipped else f"{r.seconds:.2f}s") for run in runs for r in run.steps}
    summary = {
        "model": build_spec.name,
        "toolchain": chosen.value,
        "build_id": published.manifest.build_id,
        "fingerprint": published.manifest.fingerprint,
        "store": published.store_url,
        "created": published.created,
        "aliases": published.aliases,
        "validation": {k: validation.result.get(k) for k in VALIDATION_SUMMARY},
        "stages": steps | {s.record.stage: ("skipped" if s.skipped else f"{s.record.seconds:.2f}s") for s in stages},
        "revision": published.manifest.source.revision,
        "expected_revision": revision,
        "uploaded_bytes": published.uploaded_bytes,
        "reused_bytes": published.reused_bytes,
    }
    logger.info("%s", published.summary)
    return summary
