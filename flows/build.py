"""The build flow: download, convert, quantize, build the LLM and visual engines, validate, publish.

The visual branch runs beside the LLM branch; every stage is skipped when its inputs' fingerprint
is unchanged (and the run log says so); a markdown report and a table show in the Prefect UI.
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
from vlmforge.build.reports import build_report_markdown, failure_markdown, stage_rows
from vlmforge.build.workdir import Workdir
from vlmforge.errors import SpecError
from vlmforge.sources import FetchedSource
from vlmforge.specs.catalog import load_model_or_spec
from vlmforge.specs.schema import BuildSpec, Toolchain, merge_overrides, spec_from_dict
from vlmforge.store.base import build_key


def manifest_url(store_url: str, model: str, build_id: str) -> str:
    """Where the store keeps a build's manifest, as a URL a person can open or copy."""
    return f"{store_url.rstrip('/')}/{build_key(model, build_id)}"


def _artifact_key(name: str) -> str:
    return "build-" + "".join(ch if ch.isalnum() else "-" for ch in name.lower())


def _load_spec(model: str, spec: dict[str, Any] | None, overrides: dict[str, Any]) -> BuildSpec:
    """The spec given whole (by the watch event) or the catalog entry / spec file ``model`` names."""
    if spec is None:
        return load_model_or_spec(model, overrides)
    loaded = spec_from_dict(merge_overrides(spec, overrides), origin=f"the spec parameter of {model}")
    if loaded.name != model:
        raise SpecError(f"the spec parameter is for {loaded.name!r}, not {model!r}", path="name")
    return loaded


@flow(name="build-engine", flow_run_name="build-{model}-{toolchain}", validate_parameters=True)
def build_engine(model: str, toolchain: str = "hf", store: str | None = None, workdir: str | None = None,
                 overrides: dict[str, Any] | None = None, aliases: list[str] | None = None,
                 spec: dict[str, Any] | None = None, revision: str | None = None) -> dict[str, Any]:
    """Build one engine from a catalog name or spec file, validate it and publish it to the store.

    ``spec``: the whole spec (the watch event sends the one it checked), instead of loading ``model``.
    ``revision``: the source revision the caller expects (the event's new revision). The build builds what
    it fetches; when the source has moved on since, it says so in the log and records both in the manifest.
    """
    logger = get_run_logger()
    build_spec = _load_spec(model, spec, overrides or {})
    chosen = Toolchain(toolchain)
    work = Workdir(Path(workdir) if workdir else default_workdir())
    key = _artifact_key(build_spec.name)
    if chosen is Toolchain.TRTLLM:
        from vlmforge_flows.build_trtllm import build_with_trtllm

        return build_with_trtllm(build_spec, work, store, logger, expected_revision=revision)
    pipeline = HfPipeline(build_spec, work, on_event=lambda line: None)
    progress = create_progress_artifact(0.0, description=f"{build_spec.name}: build stages done")
    stages: list[Any] = []
    extra: dict[str, Any] = {}
    try:
        fetched = t.fetch(pipeline)
        stages.append(fetched)
        if revision is not None:
            fetched_revision = FetchedSource.model_validate(fetched.result).revision
            extra = {"expected_revision": revision}
            if fetched_revision != revision:
                logger.warning("%s: expected source revision %s but fetched %s (the source moved on since): "
                               "building what was fetched", build_spec.name, revision, fetched_revision)
        update_progress_artifact(progress, 15.0)
        visual_future = t.build_visual.submit(pipeline, fetched)  # the visual branch runs beside the LLM branch
        converted = t.convert(pipeline, fetched)
        quantized = t.quantize(pipeline, converted)
        llm = t.build_llm(pipeline, converted, quantized)
        visual = visual_future.result()
        stages += [converted, *( [quantized] if quantized else []), llm, visual]
        update_progress_artifact(progress, 60.0)
        engine = t.assemble(pipeline, visual, llm)
        stages.append(engine)
        validation = t.validate(pipeline, engine, fetched)
        stages.append(validation)
        update_progress_artifact(progress, 85.0)
        if quantized is not None:  # calibration set and digest, the quantized LLM against the float32 one
            extra["quantization"] = quantized.result
        links = {"prefect_flow_run": flow_run.ui_url} if flow_run.ui_url else {}
        manifest = pipeline.manifest(fetched, engine, validation, extra=extra).model_copy(update={"links": links})
        published = t.publish(store, engine, manifest, tuple(aliases or ("latest",)))
        update_progress_artifact(progress, 100.0)
    except Exception as exc:
        create_markdown_artifact(failure_markdown(build_spec, stages, exc), key=key, description=f"{build_spec.name}: build failed")
        raise
    create_markdown_artifact(build_report_markdown(build_spec, pipeline.resolved.derived, stages, published), key=key,
                             description=f"{build_spec.name}: build report")
    create_table_artifact(stage_rows(stages), key=f"{key}-stages", description=f"{build_spec.name}: stages")
    create_link_artifact(manifest_url(published.store_url, published.manifest.model, published.manifest.build_id),
                         link_text=f"{published.manifest.model}#{published.manifest.build_id}",
                         key=f"{key}-manifest", description=f"{build_spec.name}: the published manifest")
    summary = {
        "model": build_spec.name,
        "build_id": published.manifest.build_id,
        "fingerprint": published.manifest.fingerprint,
        "store": published.store_url,
        "created": published.created,
        "aliases": published.aliases,
        "validation": {k: validation.result[k] for k in ("token_agreement", "max_logit_error", "vision_ms", "llm_ms", "e2e_ms")},
        "stages": {s.record.stage: ("skipped" if s.skipped else f"{s.record.seconds:.2f}s") for s in stages},
        "revision": published.manifest.source.revision,
        "expected_revision": revision,
        "uploaded_bytes": published.uploaded_bytes,
        "reused_bytes": published.reused_bytes,
    }
    logger.info("%s", published.summary)
    return summary
