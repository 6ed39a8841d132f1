"""What a build needs and what a machine offers: :class:`BuildInfo`, :class:`Machine`, and the choice between them.

:func:`check_build` lists why a build cannot run on a machine (toolchain, TensorRT and TensorRT-LLM versions, GPU
architecture and count, TP against the build's world size); :func:`select_build` picks the newest build that fits
and says which and why, like NIM's profile selection. Pure functions over typed values: no store, no processes.
"""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from vlmforge.artifacts.engine_config import HF_CHECKPOINT_EXTRA, EngineConfig, HfCheckpointInfo
from vlmforge.deploy.trtllm_serve import HF_DIR
from vlmforge.errors import DeployError

# --- what a build needs, what this machine has --------------------------------------------------


class BuildInfo(BaseModel):
    """What deploy needs to know of one build."""

    model: str
    build_id: str
    created_at: datetime
    toolchain: Literal["hf", "trtllm"]
    world_size: int = Field(default=1, ge=1)
    gpu_name: str | None = None
    compute_capability: str | None = None
    gpu_count: int = 0
    versions: dict[str, str] = Field(default_factory=dict)
    spec: dict[str, Any] = Field(default_factory=dict)
    """The spec it was built from (limits and parallelism size a trtllm-serve deployment)."""
    derived: dict[str, Any] = Field(default_factory=dict)
    has_hf_checkpoint: bool = False
    """It holds a Hugging Face model folder of the whole model (``hf/config.json``): what trtllm-serve loads."""
    hf_checkpoint: HfCheckpointInfo | None = None
    """What its build recorded of that folder (its architecture, checked before anything is pulled); None: a build
    without one (``artifacts.hf_checkpoint`` off, an earlier vlmforge, the trtllm toolchain)."""

    @property
    def ref(self) -> str:
        return f"{self.model}#{self.build_id}"

    @classmethod
    def from_manifest(cls, manifest: Any) -> BuildInfo:
        """From a store manifest (``vlmforge.artifacts.manifest.EngineManifest``)."""
        hw = manifest.hardware
        recorded = manifest.extra.get(HF_CHECKPOINT_EXTRA)
        try:
            folder = HfCheckpointInfo.model_validate(recorded) if recorded is not None else None
        except ValueError:  # written by a newer vlmforge: the file list still says whether the folder is there
            folder = None
        return cls(model=manifest.model, build_id=manifest.build_id, created_at=manifest.created_at,
                   toolchain=manifest.toolchain, world_size=manifest.world_size, gpu_name=hw.gpu_name,
                   compute_capability=hw.compute_capability, gpu_count=hw.gpu_count, versions=dict(manifest.versions),
                   spec=dict(manifest.spec), derived=dict(manifest.derived),
                   has_hf_checkpoint=any(entry.path == f"{HF_DIR}/config.json" for entry in manifest.files),
                   hf_checkpoint=folder)

    @classmethod
    def from_engine_dir(cls, engine_dir: Path) -> BuildInfo:
        """From a local engine directory's engine.json (its build id: ``local``)."""
        config = EngineConfig.read(engine_dir)
        versions = {k: v for k, v in (("tensorrt", config.tensorrt_version),
                                      ("tensorrt_llm", config.tensorrt_llm_version)) if v}
        created = datetime.fromtimestamp((Path(engine_dir) / "engine.json").stat().st_mtime, UTC)
        return cls(model=config.name, build_id="local", created_at=created, toolchain=config.toolchain,
                   world_size=config.world_size, compute_capability=config.compute_capability, versions=versions)


class Machine(BaseModel):
    """What this machine offers runners."""

    toolchains: dict[str, str] = Field(default_factory=dict)
    """Toolchains whose runner can start here, with the version that matters (hf: transformers,
    trtllm: tensorrt_llm)."""
    tensorrt: str | None = None
    gpu_name: str | None = None
    compute_capability: str | None = None
    gpu_count: int = 0
    cpu_count: int = 1
    mpirun: bool = False

    def summary(self) -> str:
        gpus = (f"{self.gpu_count} x {self.gpu_name} (compute capability {self.compute_capability})"
                if self.gpu_count else "no GPU")
        tools = ", ".join(f"{k} {v}" for k, v in sorted(self.toolchains.items())) or "no runner toolchain"
        return f"{gpus}, {self.cpu_count} CPU cores, {tools}" + ("" if self.mpirun else ", no mpirun")


def describe_machine() -> Machine:
    """This machine: installed runner toolchains, TensorRT, GPUs (asked through torch), cores, mpirun."""
    from vlmforge.system.env import hardware, versions

    found = versions(("transformers", "tensorrt_llm", "tensorrt"))
    toolchains: dict[str, str] = {}
    if "transformers" in found and all(importlib.util.find_spec(m) is not None for m in ("torch", "onnxruntime")):
        toolchains["hf"] = found["transformers"]
    if "tensorrt_llm" in found:
        toolchains["trtllm"] = found["tensorrt_llm"]
    hw = hardware()
    return Machine(toolchains=toolchains, tensorrt=found.get("tensorrt"), cpu_count=hw.cpu_count,
                   mpirun=shutil.which("mpirun") is not None, gpu_name=hw.gpu_name, gpu_count=hw.gpu_count,
                   compute_capability=hw.compute_capability)


# --- fitting builds to the machine ------------------------------------------------------------------


def check_build(build: BuildInfo, machine: Machine, tp: int | None = None, *, multi_host: bool = False) -> list[str]:
    """Why ``build`` cannot run here with ``tp`` ranks (default: its world size); an empty list if it can.

    ``multi_host``: the ranks are spread by a hostfile, so this machine's GPU count does not bound them.
    """
    problems: list[str] = []
    ranks = tp if tp is not None else build.world_size
    if ranks != build.world_size:
        problems.append(f"it was built and validated for {build.world_size} rank(s) (world size "
                        f"{build.world_size}), not TP {ranks}")
    if build.toolchain not in machine.toolchains:
        needs = {"hf": "torch, transformers and onnxruntime (pip install 'vlmforge[hf]')",
                 "trtllm": "TensorRT-LLM (NVIDIA's TensorRT-LLM container)"}[build.toolchain]
        problems.append(f"its {build.toolchain} runner needs {needs}, which this machine lacks")
    if build.toolchain == "trtllm":
        if not machine.gpu_count:
            problems.append("a TensorRT engine needs an NVIDIA GPU; this machine has none")
        elif build.compute_capability and build.compute_capability != machine.compute_capability:
            problems.append(f"it was built for GPU compute capability {build.compute_capability}"
                            f"{f' ({build.gpu_name})' if build.gpu_name else ''}; this GPU ({machine.gpu_name}) is "
                            f"{machine.compute_capability}, and TensorRT engines run only on the architecture that "
                            "built them")
        for package, have in (("tensorrt", machine.tensorrt), ("tensorrt_llm", machine.toolchains.get("trtllm"))):
            built = build.versions.get(package)
            if built and have and built != have:
                problems.append(f"it was built with {package} {built}; this machine has {have}")
    if machine.gpu_count and not multi_host and ranks > machine.gpu_count:
        problems.append(f"TP {ranks} needs {ranks} GPUs; this machine has {machine.gpu_count} (or pass --hostfile)")
    if ranks > 1 and not machine.mpirun:
        problems.append(f"TP {ranks} runs under mpirun, which is not installed (apt-get install openmpi-bin)")
    return problems


class Selection(BaseModel):
    """The build deploy chose, why, and why each newer or other build was passed over."""

    build: BuildInfo
    reason: str
    skipped: list[tuple[str, list[str]]] = Field(default_factory=list)

    def explain(self) -> str:
        lines = [self.reason]
        lines += [f"  skipped {ref}: {'; '.join(problems)}" for ref, problems in self.skipped]
        return "\n".join(lines)


def fits(build: BuildInfo, machine: Machine, tp: int | None) -> str:
    """Why ``build`` runs here with ``tp`` ranks, in a phrase (the selection's reason)."""
    where = (f"{machine.gpu_count} x {machine.gpu_name} (compute capability {machine.compute_capability})"
             if machine.gpu_count else "the CPU")
    ranks = tp if tp is not None else build.world_size
    parts = [f"toolchain {build.toolchain} is here ({machine.toolchains[build.toolchain]})",
             f"TP {ranks} = its world size", f"runs on {where}"]
    if build.toolchain == "trtllm":
        parts.insert(1, f"built for compute capability {build.compute_capability} with TensorRT-LLM "
                        f"{build.versions.get('tensorrt_llm', '?')}")
    return ", ".join(parts)


def select_build(builds: Sequence[BuildInfo], machine: Machine, tp: int | None = None, *,
                 multi_host: bool = False) -> Selection:
    """The newest build that fits this machine (and ``tp``, if given); DeployError naming every build's misfit."""
    if not builds:
        raise DeployError("no published builds to choose from")
    ordered = sorted(builds, key=lambda b: (b.created_at, b.build_id), reverse=True)
    skipped: list[tuple[str, list[str]]] = []
    for build in ordered:
        problems = check_build(build, machine, tp, multi_host=multi_host)
        if not problems:
            newest = "the newest build" if not skipped else f"the newest of {len(ordered)} builds that fits"
            return Selection(build=build, skipped=skipped,
                             reason=f"selected {build.ref} ({build.created_at:%Y-%m-%d %H:%M} UTC), {newest}: "
                                    f"{fits(build, machine, tp)}")
        skipped.append((build.ref, problems))
    lines = "\n".join(f"  {ref}: {'; '.join(problems)}" for ref, problems in skipped)
    asked = f" with TP {tp}" if tp is not None else ""
    raise DeployError(f"no build of {ordered[0].model} can run on this machine{asked} ({machine.summary()}):\n{lines}")

