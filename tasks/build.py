"""Prefect tasks for one engine build: each wraps one stage of :class:`vlmforge.build.pipeline.HfPipeline` or
:class:`vlmforge.build.trtllm_pipeline.TrtllmPipeline`; both toolchains publish through the same task."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from vlmforge_tasks.common import retry_transient
from vlmforge.build.pipeline import HfPipeline
from vlmforge.build.trtllm_pipeline import PlanRun, TrtllmPipeline
from vlmforge.build.workdir import STAGE_LOG_ATTR, StageOutcome

# Stage results are cached by vlmforge's own fingerprinted work dir (it survives SIGKILL and needs no
# result storage), so Prefect's task cache is off.
STAGE = {"cache_policy": NONE, "persist_result": False}


def _log(outcome: StageOutcome | None) -> StageOutcome | None:
    if outcome is not None:
        get_run_logger().info(outcome.reason, extra=outcome.log_extra)
    return outcome


@task(name="fetch", retries=3, retry_delay_seconds=[2, 10, 30], retry_condition_fn=retry_transient, **STAGE)
def fetch(pipeline: HfPipeline) -> StageOutcome:
    """Resolve the source revision, download and verify."""
    return _log(pipeline.fetch())


@task(name="convert", **STAGE)
def convert(pipeline: HfPipeline, fetched: StageOutcome) -> StageOutcome:
    return _log(pipeline.convert(fetched))


@task(name="quantize", **STAGE)
def quantize(pipeline: HfPipeline, converted: StageOutcome) -> StageOutcome | None:
    return _log(pipeline.quantize(converted))


@task(name="build-llm-engine", **STAGE)
def build_llm(pipeline: HfPipeline, converted: StageOutcome, quantized: StageOutcome | None) -> StageOutcome:
    return _log(pipeline.build_llm(converted, quantized))


@task(name="build-visual-engine", **STAGE)
def build_visual(pipeline: HfPipeline, fetched: StageOutcome) -> StageOutcome:
    return _log(pipeline.build_visual(fetched))


@task(name="assemble-engine", **STAGE)
def assemble(pipeline: HfPipeline, visual: StageOutcome, llm: StageOutcome, converted: StageOutcome,
             quantized: StageOutcome | None = None) -> StageOutcome:
    return _log(pipeline.assemble(visual, llm, converted, quantized))


@task(name="validate", **STAGE)
def validate(pipeline: HfPipeline, engine: StageOutcome, fetched: StageOutcome) -> StageOutcome:
    """Run the engine through the deployment runner against the float32 reference; fails below threshold."""
    return _log(pipeline.validate(engine, fetched))


# --- trtllm ------------------------------------------------------------------------------------

@task(name="resolve-revision", retries=3, retry_delay_seconds=[2, 10, 30], retry_condition_fn=retry_transient, **STAGE)
def trtllm_revision(pipeline: TrtllmPipeline) -> str:
    """The exact source revision the plan's fetch step downloads."""
    return pipeline.source_revision()


@task(name="run-trtllm-plan", **STAGE)
def run_trtllm_plan(pipeline: TrtllmPipeline, revision: str) -> PlanRun:
    """The plan's steps, holding the build's GPUs in the `gpu` global concurrency limit (infra/setup-pools.sh)."""
    from prefect.concurrency.sync import concurrency

    logger = get_run_logger()
    with concurrency("gpu", occupy=pipeline.plan.derived.world_size, strict=False):
        return pipeline.run_plan(revision, on_line=logger.info)


@task(name="assemble-engine", **STAGE)
def assemble_trtllm(pipeline: TrtllmPipeline, run: PlanRun) -> StageOutcome:
    return _log(pipeline.assemble(run))


@task(name="validate", **STAGE)
def validate_trtllm(pipeline: TrtllmPipeline, engine: StageOutcome) -> StageOutcome:
    """Run the TensorRT engine through the runner against the float32 reference; fails below threshold."""
    return _log(pipeline.validate(engine))


# --- both ---------------------------------------------------------------------------------------

@task(name="publish", retries=3, retry_delay_seconds=[2, 10, 30], retry_condition_fn=retry_transient, **STAGE)
def publish(store_url: str | None, engine: StageOutcome, manifest: Any, aliases: tuple[str, ...] = ("latest",)) -> Any:
    """Push the engine and its manifest to the artifact store (a build with the same fingerprint is not pushed again)."""
    from vlmforge.build.publish import publish_engine

    result = publish_engine(store_url, engine.path, manifest, aliases=aliases)
    get_run_logger().info(result.summary, extra={STAGE_LOG_ATTR: "publish"})
    return result
