"""One trtllm build as stages (no Prefect here), beside :class:`vlmforge.build.pipeline.HfPipeline`.

The plan's argv steps run through the TensorRT-LLM runtime (:mod:`vlmforge.toolchains.trtllm.runtime`), which
resumes after the last completed step; then two fingerprinted work-dir stages, as on the hf path: ``engine``
(the plan's engine hard-linked into a stage folder with processor/ and engine.json) and ``validate`` (the engine
through the runner against the float32 hf reference, judged by the spec's thresholds). The manifest comes from
the same :func:`~vlmforge.build.pipeline.engine_manifest`, and the flow publishes both toolchains' engines through
the same publish task, aliases included. TensorRT-LLM itself runs only inside NVIDIA's container with a GPU:
elsewhere constructing the pipeline refuses (``require_trtllm``) before any work.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmforge.build.fingerprint import fingerprint, spec_for_fingerprint
from vlmforge.build.pipeline import BUILD_KEY, STAGE_CODE_VERSION, engine_manifest
from vlmforge.build.workdir import StageOutcome, Workdir
from vlmforge.errors import SpecError, ToolchainUnavailable
from vlmforge.families import ResolvedSpec, resolve
from vlmforge.sources import open_source
from vlmforge.sources.base import link_or_copy
from vlmforge.specs.schema import BuildSpec, Dialect
from vlmforge.system.env import versions
from vlmforge.toolchains.trtllm.execute import StepRun, check_buildable
from vlmforge.toolchains.trtllm.plan import build_plan
from vlmforge.toolchains.trtllm.runtime import ContainerRuntime, TrtllmRuntime

log = logging.getLogger(__name__)


def default_runtime() -> TrtllmRuntime:
    """The runtime a pipeline uses unless given one: TensorRT-LLM in this container."""
    return ContainerRuntime()


def check_trtllm_buildable(resolved: ResolvedSpec) -> None:
    """Refuse, before any work, what a trtllm build cannot finish: a family without a transformers reference to
    validate against, a plan in another dialect than the container's."""
    check_buildable(resolved.family)
    if resolved.spec.artifacts.hf_checkpoint:
        raise SpecError("artifacts.hf_checkpoint (a Hugging Face folder of the whole model, for trtllm-serve) is "
                        "written by the hf toolchain only: build this spec with --toolchain hf, or set "
                        "artifacts.hf_checkpoint: false", path="artifacts.hf_checkpoint")
    if resolved.spec.dialect is not Dialect.V1_2:
        raise ToolchainUnavailable("the trtllm toolchain executes dialect 1.2 plans; render 0.9 plans with "
                                   "`vlmforge plan --dialect 0.9` for older containers")


@dataclass(frozen=True)
class PlanRun:
    """The plan's steps as this build ran them, from one source revision."""

    source_revision: str
    steps: list[StepRun]


@dataclass
class TrtllmPipeline:
    """The trtllm toolchain's stages for one spec (dialect 1.2 plans)."""

    spec: BuildSpec
    workdir: Workdir
    runtime: TrtllmRuntime | None = None
    """TensorRT-LLM as the build uses it; default: :func:`default_runtime`."""
    on_event: Callable[[str], None] = field(default=log.info)
    """Receives one line per stage (done or skipped) and every line the plan's steps print."""

    def __post_init__(self) -> None:
        self.resolved: ResolvedSpec = resolve(self.spec)
        check_trtllm_buildable(self.resolved)
        self._runtime: TrtllmRuntime = self.runtime or default_runtime()
        self.trtllm_version = self._runtime.version()  # refuses here, before any work, outside NVIDIA's container
        self.workspace = self.workdir.root / "trtllm" / self.spec.name
        self.plan = build_plan(self.spec, workspace=str(self.workspace))

    @property
    def model(self) -> str:
        return self.spec.name

    @property
    def hf_dir(self) -> Path:
        """The checkpoint the plan's fetch step downloads (the validation reference)."""
        return self.workspace / "hf_models" / self.spec.name

    # --- stages -----------------------------------------------------------------------------

    def source_revision(self) -> str:
        """The exact revision the plan's fetch step downloads, resolved first (it keys every step's marker)."""
        return open_source(self.spec.source).resolve_revision()

    def run_plan(self, revision: str, on_line: Callable[[str], None] | None = None) -> PlanRun:
        """Every plan step, skipping those completed before with the same command and revision."""
        steps = self._runtime.execute(self.plan, self.workspace, on_line or self.on_event, inputs=revision)
        return PlanRun(source_revision=revision, steps=steps)

    def engine_fingerprint(self, run: PlanRun) -> str:
        """What the engine is: the spec, the source revision, the plan, the release and the GPU architecture."""
        return self._engine_fp(run.source_revision)

    def _engine_fp(self, revision: str) -> str:
        return fingerprint("trtllm", spec_for_fingerprint(self.spec), revision, self.plan.to_json_dict(),
                           self.trtllm_version, self._runtime.compute_capability())

    def _validate_fp(self, engine_fp: str) -> str:
        return fingerprint("validate", STAGE_CODE_VERSION, engine_fp, self.spec.validation.model_dump(mode="json"))

    def build_key(self, revision: str) -> str:
        """The whole build's key from the source revision alone: the engine's and the validation's fingerprints
        (what the published-build check compares with the key each manifest records)."""
        return fingerprint("trtllm-build", self._validate_fp(self._engine_fp(revision)))

    def assemble(self, run: PlanRun) -> StageOutcome:
        """The plan's engine (llm/, vision/) hard-linked into a stage folder, with processor/ and engine.json."""
        from vlmforge.toolchains.trtllm import stages

        def work(out: Path) -> Any:
            shutil.copytree(self.plan.engine_dir, out, dirs_exist_ok=True, copy_function=link_or_copy)
            return stages.assemble(self.resolved, out, self.hf_dir, trtllm_version=self.trtllm_version,
                                   tensorrt_version=versions(("tensorrt",)).get("tensorrt"),
                                   compute_capability=self._runtime.compute_capability())

        return self._run("engine", self.engine_fingerprint(run), work)

    def validate(self, engine: StageOutcome) -> StageOutcome:
        """The engine through the runner against the float32 reference; fails below the spec's thresholds."""
        from vlmforge.toolchains.trtllm import stages

        return self._run("validate", self._validate_fp(engine.record.fingerprint), lambda out: stages.validate(
            self.resolved, self._runtime.load_engine(engine.path, self.hf_dir), self.hf_dir,
            device=self._runtime.reference_device))

    def _run(self, stage: str, fp: str, work: Callable[[Path], Any]) -> StageOutcome:
        outcome = self.workdir.run(self.model, stage, fp, work)
        self.on_event(outcome.reason)
        return outcome

    # --- results ----------------------------------------------------------------------------

    def manifest(self, run: PlanRun, engine: StageOutcome, validation: StageOutcome,
                 extra: dict[str, Any] | None = None) -> Any:
        """The manifest of this build (published by the store), with ``vlmforge checkpoint``'s read-back figures
        where the plan has that step."""
        extra = {**(extra or {}), BUILD_KEY: self.build_key(run.source_revision)}
        report = self.checkpoint_report()
        if report is not None:
            extra["checkpoint"] = report
        return engine_manifest(self.spec, self.resolved.derived, toolchain="trtllm", source_revision=run.source_revision,
                               fingerprint=engine.record.fingerprint, files=engine.record.files,
                               validation=validation.result, extra=extra)

    def checkpoint_report(self) -> dict[str, Any] | None:
        """The JSON report the plan's checkpoint step wrote (None where the step is the container's script)."""
        report = next((Path(out) for step in self.plan.steps if step.name == "checkpoint" for out in step.outputs
                       if out.endswith(".json")), None)
        if report is None or not report.is_file():
            return None
        return json.loads(report.read_text())

    def remove_checkpoints(self) -> None:
        """The converted checkpoints are intermediate: gone once the engine is published."""
        shutil.rmtree(self.workspace / "trt_models", ignore_errors=True)

    def run(self) -> tuple[PlanRun, StageOutcome, StageOutcome]:
        """All stages in order: (plan run, engine, validation)."""
        run = self.run_plan(self.source_revision())
        engine = self.assemble(run)
        return run, engine, self.validate(engine)
