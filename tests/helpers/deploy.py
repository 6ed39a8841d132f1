"""Deploy test helpers: constructed builds and machines, a build source that records what was pulled, the deploy
CLI run as a user runs it, and deployment records written as the launchers write them."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from tests.helpers.net import ROOT
from tests.helpers.runners import runner_env
from vlmforge.deploy.machine import BuildInfo, Machine
from vlmforge.deploy.records import Deployment, pid_path, write_record

T0 = datetime(2026, 11, 1, tzinfo=UTC)
TRT = {"tensorrt": "10.13.3", "tensorrt_llm": "1.2.1"}

H100x2 = Machine(toolchains={"hf": "5.24.0", "trtllm": "1.2.1"}, tensorrt="10.13.3", gpu_name="NVIDIA H100 80GB HBM3",
                 compute_capability="9.0", gpu_count=2, cpu_count=32, mpirun=True)
CPU = Machine(toolchains={"hf": "5.24.0"}, cpu_count=2, mpirun=True)
SERVE = [sys.executable, "-m", "vlmforge", "serve", "/engines/tiny-llava", "--host", "127.0.0.1"]
"""A runner's command line, as records name it."""


def build(build_id: str, age_days: int, toolchain: str = "trtllm", world_size: int = 1, cc: str | None = "9.0",
          versions: dict[str, str] | None = None) -> BuildInfo:
    return BuildInfo(model="llava-1.5-7b-hf", build_id=build_id, created_at=T0 - timedelta(days=age_days),
                     toolchain=toolchain, world_size=world_size, compute_capability=cc if toolchain == "trtllm" else None,
                     gpu_name={"9.0": "NVIDIA H100", "8.0": "NVIDIA A100"}.get(cc or ""), gpu_count=world_size,
                     versions=(TRT if versions is None else versions) if toolchain == "trtllm" else {})


BUILDS = [
    build("a100-newest", 0, cc="8.0"),
    build("h100-tp4", 1, world_size=4),
    build("h100-old-trtllm", 2, versions={"tensorrt": "10.13.3", "tensorrt_llm": "1.1.0"}),
    build("h100-tp2", 3, world_size=2),
    build("h100-tp1", 4),
    build("hf-tp1", 5, toolchain="hf"),
]


class RecordingSource:
    """Builds as a store would describe them; records whether anything was pulled (nothing may be)."""

    def __init__(self, builds: list[BuildInfo]) -> None:
        self.builds = builds
        self.pulled: list[str] = []

    def describe(self) -> str:
        return "test builds"

    def candidates(self, ref: str) -> list[BuildInfo]:
        if "#" in ref:
            return [b for b in self.builds if b.ref == ref]
        return list(self.builds)

    def pull(self, build: BuildInfo, cache_dir: Path, *, exclude: frozenset[str] = frozenset()) -> Path:
        self.pulled.append(build.ref)
        raise AssertionError("nothing may be pulled")


class UnaskedSource(RecordingSource):
    """A source that must not even be asked for builds (a refusal comes first)."""

    def candidates(self, ref: str) -> list[BuildInfo]:
        raise AssertionError("the source was asked before the refusal")


def cli(*args: str, state: Path, timeout: float = 120, cache: Path | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m vlmforge ARGS --state-dir STATE`` in the runner environment (plus ``env``)."""
    extra = {**({"VLMFORGE_CACHE": str(cache)} if cache else {}), **(env or {})}
    return subprocess.run([sys.executable, "-m", "vlmforge", *args, "--state-dir", str(state)], env=runner_env(**extra),
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False)


def record(state: Path, pid: int, **fields: object) -> Deployment:
    """A process deployment ``tiny`` recorded in ``state`` with launcher ``pid`` (``fields`` override)."""
    values: dict[str, object] = {
        "name": "tiny", "model": "tiny-llava", "build_id": "local", "engine_dir": Path("/engines/tiny-llava"),
        "endpoint": "http://127.0.0.1:1", "host": "127.0.0.1", "port": 1, "tp": 1, "pid": pid,
        "pid_file": pid_path(state, "tiny"), "log": state / "tiny.log", "argv": SERVE, "source": "test",
        "selection": "test", "started_at": datetime.now(UTC)}
    deployment = Deployment.model_validate({**values, **fields})
    write_record(deployment, state)
    return deployment


def publish_tiny_engine(tiny_engine: Path, store_url: str, model: str = "tiny-llava") -> str:
    """Publish the tiny engine directory as a build of ``model`` (a fresh build id); its ref ``model#id``."""
    import json

    from vlmforge.artifacts.manifest import EngineManifest, SourceInfo
    from vlmforge.sources import hash_tree
    from vlmforge.store import open_store

    config = json.loads((tiny_engine / "engine.json").read_text())
    files = [f for f in hash_tree(tiny_engine) if f.path != "_stage.json"]
    manifest = EngineManifest(model=model, build_id=f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-abcdef01",
                              fingerprint="ab" * 32, created_at=datetime.now(UTC), toolchain="hf",
                              source=SourceInfo(uri="tiny://llava", revision="test"), world_size=config["world_size"],
                              files=tuple(files))
    with open_store(store_url) as store:
        store.publish(tiny_engine, manifest)
    return f"{model}#{manifest.build_id}"
