"""One build as a set of fingerprinted, resumable stages (no Prefect here).

Each method runs one stage through :class:`vlmforge.build.workdir.Workdir`: its fingerprint covers the
stage's own settings, its inputs' fingerprints and the library versions, so a stage whose inputs
are unchanged is skipped and a stage after a change is redone. The visual stage is keyed by the content of
the vision weights and configs (:mod:`vlmforge.build.weights`), not by the whole revision, so a new revision
that only changes the LLM reuses the visual engine. The Prefect flow calls these
methods as tasks (and runs the visual and LLM branches at once); ``HfPipeline.run`` runs them in
order for scripts and the GPU benchmarks.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vlmforge.build.fingerprint import fingerprint, spec_for_fingerprint
from vlmforge.build.fingerprint import fingerprint as fingerprint_of
from vlmforge.build.revisions import RevisionMemo
from vlmforge.build.weights import PartDigest, visual_inputs_digest
from vlmforge.build.workdir import StageOutcome, Workdir
from vlmforge.errors import SourceError, SourceMoved
from vlmforge.families import ResolvedSpec, resolve
from vlmforge.sources import FetchedSource, open_source, verify_tree
from vlmforge.specs.schema import BuildSpec
from vlmforge.system.env import hardware, versions

log = logging.getLogger(__name__)

STAGE_CODE_VERSION = 1
"""Bump when a stage's output changes for the same inputs (it is part of every fingerprint)."""
BUILD_KEY = "build_key"
"""The manifest's ``extra`` entry holding the build's key (see :meth:`HfFingerprints.build_key`)."""
LIBRARIES = ("torch", "transformers", "nvidia-modelopt", "onnx", "onnxruntime", "safetensors")


STAGE_MODULES = ("torch", "transformers", "vlmforge.toolchains.hf.stages", "vlmforge.toolchains.hf.onnx",
                 "vlmforge.runner.engine")
"""What the hf stages import (seconds on a small machine): see :func:`import_stage_modules`."""


def import_stage_modules() -> None:
    """Import what the hf stages use, so a caller can pay for it while it waits on something else (the CLI: while
    Prefect's server starts) rather than inside the first stage."""
    import importlib

    for name in STAGE_MODULES:
        importlib.import_module(name)


def default_workdir() -> Path:
    import os

    return Path(os.environ.get("VLMFORGE_WORKDIR", "~/.cache/vlmforge/work")).expanduser()


@dataclass(frozen=True)
class HfFingerprints:
    """Every hf stage's fingerprint as a pure function of its inputs' fingerprints: what :class:`HfPipeline` keys its
    stages by, and what :meth:`build_key` derives, before anything runs, from the source revision alone."""

    resolved: ResolvedSpec
    libraries: dict[str, str]

    def _fp(self, stage: str, *parts: Any) -> str:
        return fingerprint(stage, STAGE_CODE_VERSION, self.libraries, *parts)

    def fetch(self, revision: str) -> str:
        return fingerprint("fetch", STAGE_CODE_VERSION, self.resolved.spec.source, revision)

    def convert(self, fetched: str) -> str:
        spec = spec_for_fingerprint(self.resolved.spec)
        return self._fp("convert", fetched, spec["family"], spec["dtype"], spec["architecture"], spec["parallel"]["tp"])

    def quantize(self, converted: str, calibration: str | None) -> str:
        """``calibration``: the calibration set's digest (None where nothing is calibrated)."""
        settings = self.resolved.spec.quantization.model_dump(
            mode="json", exclude={"calibration"} if calibration is None else set())
        # with artifacts.hf_checkpoint it also writes the whole model's unified export (only then in the fingerprint)
        whole = ("whole-model-folder", "unified") if self.resolved.spec.artifacts.hf_checkpoint else ()
        return self._fp("quantize", converted, settings, calibration, *whole)

    def llm(self, upstream: str) -> str:
        return self._fp("llm", upstream)

    def visual(self, basis: tuple[str, ...]) -> str:
        return self._fp("visual", *basis, self.resolved.spec.family)

    def visual_basis_of(self, fetched: str) -> tuple[str, ...]:
        """What stands for the visual inputs' digest in :meth:`build_key`: the download (its revision fixes the
        bytes, so the digest) and the family's rules for picking the visual part out of it."""
        family = self.resolved.family
        return ("visual-inputs-of", fetched, fingerprint(family.visual_weight_prefixes, family.llm_config_keys,
                                                          family.visual_config_files))

    def engine(self, visual: str, llm: str, converted: str, quantized: str | None = None) -> str:
        """``converted``: the convert stage, whose whole-model checkpoint the engine directory holds as ``hf/`` with
        ``artifacts.hf_checkpoint`` (only then part of the fingerprint: off, it is the one of builds before it);
        ``quantized``: the quantize stage, whose unified export of the whole model is ``hf/`` of a quantized spec
        (the folder's kind and method are then in the fingerprint too)."""
        folder: tuple[Any, ...] = ()
        if self.resolved.spec.artifacts.hf_checkpoint:
            quant = self.resolved.spec.quantization
            folder = ((("whole-model-folder", "unified", quant.method.value, quant.kv_cache_dtype.value, quantized),)
                      if quant.active else (("whole-model-folder", converted),))
        return self._fp("engine", visual, llm, *folder, spec_for_fingerprint(self.resolved.spec),
                        self.resolved.derived.model_dump(mode="json"))

    def validate(self, engine: str, fetched: str) -> str:
        return self._fp("validate", engine, fetched, self.resolved.spec.validation.model_dump(mode="json"))

    def build_key(self, revision: str, calibration: str | None) -> str:
        """The whole build's key: the stages' fingerprint chain from ``revision`` to validation, with the visual
        inputs' digest (which needs the downloaded files) stood in for by what determines it. Same key, same engine
        fingerprint and same validation: the published-build check compares it with the key each manifest records."""
        fetched = self.fetch(revision)
        converted = self.convert(fetched)
        quantized = self.quantize(converted, calibration) if self.resolved.spec.quantization.active else None
        engine = self.engine(self.visual(self.visual_basis_of(fetched)), self.llm(quantized or converted), converted,
                             quantized)
        return fingerprint("hf-build", self.validate(engine, fetched))


def calibration_of(resolved: ResolvedSpec) -> str | None:
    """The calibration set's digest for the quantize stage's fingerprint (None without an active quantization)."""
    if not resolved.spec.quantization.active:
        return None
    from vlmforge.toolchains.quantize.hf import calibration_digest

    return calibration_digest(resolved)  # the set's content: other images or prompts, another build


def hf_fingerprints(spec: BuildSpec) -> HfFingerprints:
    """The fingerprints of ``spec``'s hf build with this machine's libraries (no torch import, no device)."""
    return HfFingerprints(resolve(spec), dict(versions(LIBRARIES)))


@dataclass
class HfPipeline:
    """The hf toolchain's stages for one spec."""

    spec: BuildSpec
    workdir: Workdir
    device: str | None = None
    on_event: Callable[[str], None] = field(default=log.info)
    """Receives one line per stage: done (with its time) or skipped (with why)."""

    def __post_init__(self) -> None:
        from vlmforge.toolchains.hf.stages import check_supported, default_device

        self.resolved: ResolvedSpec = resolve(self.spec)
        check_supported(self.resolved)
        self.device = self.device or default_device()
        self.fingerprints = HfFingerprints(self.resolved, dict(versions(LIBRARIES)))

    @property
    def model(self) -> str:
        return self.spec.name

    def _run(self, stage: str, fp: str, work: Callable[[Path], Any]) -> StageOutcome:
        outcome = self.workdir.run(self.model, stage, fp, work)
        self.on_event(outcome.reason)
        return outcome

    # --- stages -----------------------------------------------------------------------------

    def fetch(self, *, attempts: int = 3) -> StageOutcome:
        """Resolve the source's exact revision and download it (verified); reused while the revision holds.

        The download is pinned to the resolved revision (it is the stage's key); a source that moves on in between
        is resolved again, up to ``attempts`` times."""
        source = open_source(self.spec.source, digests=self.workdir.digests)  # one read of each byte: resolve,
        revision = source.resolve_revision()                                   # fetch and the stage record share it
        RevisionMemo(self.workdir.root).remember(source, revision)
        try:
            outcome = self._run("fetch", self.fingerprints.fetch(revision),
                                lambda out: source.fetch(out / "model", revision=revision))
        except SourceMoved as exc:
            if attempts <= 1:
                raise
            self.on_event(f"fetch: {exc}")
            return self.fetch(attempts=attempts - 1)
        fetched = FetchedSource.model_validate(outcome.result)
        if outcome.skipped:
            try:
                verify_tree(outcome.path / "model", fetched.files, digests=self.workdir.digests)
            except SourceError as exc:
                self.on_event(f"fetch: cached download is corrupt ({exc}): downloading again")
                shutil.rmtree(outcome.path)
                return self.fetch()
        return outcome

    def convert(self, fetched: StageOutcome) -> StageOutcome:
        from vlmforge.toolchains.hf import stages

        fp = self.fingerprints.convert(fetched.record.fingerprint)
        return self._run("convert", fp, lambda out: stages.convert(self.resolved, fetched.path / "model", out, device=self.device))

    def quantize(self, converted: StageOutcome) -> StageOutcome | None:
        from vlmforge.toolchains.hf import stages

        if not self.spec.quantization.active:
            return None
        fp = self.fingerprints.quantize(converted.record.fingerprint, calibration_of(self.resolved))
        return self._run("quantize", fp, lambda out: stages.quantize(self.resolved, converted.path / "checkpoint", out,
                                                                   device=self.device))

    def build_llm(self, converted: StageOutcome, quantized: StageOutcome | None) -> StageOutcome:
        from vlmforge.toolchains.hf import stages

        fp = self.fingerprints.llm((quantized or converted).record.fingerprint)
        done = (quantized.path, stages.QuantizeResult.model_validate(quantized.result)) if quantized else None
        return self._run("llm", fp, lambda out: stages.build_llm(
            self.resolved, converted.path / "checkpoint", done, out, device=self.device))

    def visual_inputs(self, fetched: StageOutcome) -> PartDigest | None:
        """The digest of what the visual engine is built from (vision tensors and configs), if the family says."""
        family = self.resolved.family
        return visual_inputs_digest(fetched.path / "model", family.visual_weight_prefixes, family.llm_config_keys,
                                    family.visual_config_files)

    def build_visual(self, fetched: StageOutcome) -> StageOutcome:
        """Keyed by the vision weights' content, not the whole revision: new LLM weights reuse it."""
        from vlmforge.toolchains.hf import stages

        inputs = self.visual_inputs(fetched)
        if inputs is None:
            basis: tuple[str, str] = ("checkpoint", fetched.record.fingerprint)
        else:
            basis = ("visual-inputs", inputs.digest)
            log.info("visual inputs: %d tensors (%d bytes) and %s, digest %s", inputs.tensors, inputs.tensor_bytes,
                     ", ".join(inputs.configs), inputs.digest[:12])
        fp = self.fingerprints.visual(basis)
        return self._run("visual", fp, lambda out: stages.build_visual(self.resolved, fetched.path / "model", out))

    def assemble(self, visual: StageOutcome, llm: StageOutcome, converted: StageOutcome,
                 quantized: StageOutcome | None = None) -> StageOutcome:
        """The engine directory; ``converted``'s checkpoint (unquantized) or ``quantized``'s unified export of the
        whole model becomes its ``hf/`` (hard links: hashed once per build)."""
        from vlmforge.toolchains.hf import stages

        fp = self.fingerprints.engine(visual.record.fingerprint, llm.record.fingerprint, converted.record.fingerprint,
                                      quantized.record.fingerprint if quantized is not None else None)
        done = (quantized.path, stages.QuantizeResult.model_validate(quantized.result)) if quantized else None
        return self._run("engine", fp, lambda out: stages.assemble(
            self.resolved, visual.path, stages.VisualResult.model_validate(visual.result), llm.path,
            stages.LlmResult.model_validate(llm.result), converted.path / "checkpoint", out, done))

    def validate(self, engine: StageOutcome, fetched: StageOutcome) -> StageOutcome:
        from vlmforge.toolchains.hf import stages

        fp = self.fingerprints.validate(engine.record.fingerprint, fetched.record.fingerprint)
        return self._run("validate", fp, lambda out: stages.validate(self.resolved, engine.path, fetched.path / "model",
                                                                     device=self.device))

    # --- results ----------------------------------------------------------------------------

    def manifest(self, fetched: StageOutcome, engine: StageOutcome, validation: StageOutcome,
                 extra: dict[str, Any] | None = None) -> Any:
        """The manifest of this build (published by the store)."""
        from vlmforge.artifacts.engine_config import HF_CHECKPOINT_EXTRA, EngineConfig

        revision = FetchedSource.model_validate(fetched.result).revision
        key = self.fingerprints.build_key(revision, calibration_of(self.resolved))
        folder = EngineConfig.model_validate(engine.result).hf_checkpoint
        recorded = {HF_CHECKPOINT_EXTRA: folder.model_dump(mode="json")} if folder is not None else {}
        return engine_manifest(self.spec, self.resolved.derived, toolchain="hf", source_revision=revision,
                               fingerprint=engine.record.fingerprint, files=engine.record.files,
                               validation=validation.result, extra={**(extra or {}), **recorded, BUILD_KEY: key})

    def run(self, *, overlap: bool = False) -> tuple[StageOutcome, StageOutcome, StageOutcome]:
        """All stages: (fetched, engine, validation). In order, or with ``overlap`` the visual stage (ONNX export on
        the CPU) in a thread beside convert, quantize and the LLM stage (on the GPU), as the build flow runs them."""
        fetched = self.fetch()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="visual") as pool:
            visual_later = pool.submit(self.build_visual, fetched) if overlap else None
            converted = self.convert(fetched)
            quantized = self.quantize(converted)
            llm = self.build_llm(converted, quantized)
            visual = visual_later.result() if visual_later is not None else self.build_visual(fetched)
        engine = self.assemble(visual, llm, converted, quantized)
        validation = self.validate(engine, fetched)
        return fetched, engine, validation


def engine_manifest(spec: BuildSpec, derived: Any, *, toolchain: str, source_revision: str, files: list[Any],
                    validation: dict[str, Any], fingerprint: str | None = None, fingerprint_parts: tuple[Any, ...] = (),
                    extra: dict[str, Any] | None = None) -> Any:
    """A build's manifest: what was built, from which revision, with what, on what, and how it validated."""
    from vlmforge.artifacts.manifest import EngineManifest, FileEntry, HardwareInfo, SourceInfo, new_build_id

    hw = hardware()
    fp = fingerprint or fingerprint_of(toolchain, spec_for_fingerprint(spec), source_revision, *fingerprint_parts)
    now = datetime.now(UTC)
    return EngineManifest(
        model=spec.name,
        build_id=new_build_id(fp, now),
        fingerprint=fp,
        created_at=now,
        toolchain=toolchain,
        spec=spec.model_dump(mode="json"),
        derived=derived.model_dump(mode="json"),
        source=SourceInfo(uri=spec.source, revision=source_revision),
        versions=versions(),
        hardware=HardwareInfo(gpu_name=hw.gpu_name, compute_capability=hw.compute_capability, gpu_count=hw.gpu_count,
                              cpu=hw.cpu),
        world_size=derived.world_size,
        files=tuple(FileEntry(path=f.path, sha256=f.sha256, size=f.size) for f in files),
        validation=validation,
        extra=extra or {},
    )
