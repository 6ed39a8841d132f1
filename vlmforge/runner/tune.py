"""Warm starts: the static decode path's compile caches, saved after a warm-up on one machine (``vlmforge tune``) and
loaded before the warm-up of the next runner on a machine of the same kind.

``torch.compiler.save_cache_artifacts()`` returns torch's portable caches (Inductor's FX graph cache with its
bundled Triton kernels, autotuning results, AOTAutograd entries) of what this process compiled;
``load_cache_artifacts`` puts them into this process's cache directories, so the compiles that follow hit them
instead of tracing, autotuning and compiling kernels again. Where torch can (:mod:`vlmforge.runner.precompile`),
the artifact also holds each bucket's decode step compiled ahead of time, which a runner loads without tracing the
model at all (``vlmforge tune --precompile``). They are valid only for the same engine, GPU (or CPU architecture), torch and Triton versions, compile
mode and buckets: :class:`~vlmforge.store.tune.TuneKey`. A start never fails because of a tune artifact: any mismatch,
absence or damage is a warning and an ordinary cold compile.

The artifact is a zip archive (stored, not compressed: the caches are compressed kernels and code already):
``compile-caches.bin`` (what ``save_cache_artifacts`` returned) and ``steps/<batch>x<length>.bin`` (one package per
bucket). An artifact of an earlier vlmforge is the bare compile caches, and still loads.
"""

from __future__ import annotations

import io
import logging
import platform
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from vlmforge.errors import DeployError
from vlmforge.store.tune import TuneKey, TuneRecord, newest_matching
from vlmforge.system.env import versions

log = logging.getLogger(__name__)

WARMUP_PROMPT_EXTRA = 32
"""Text positions the warm-up prompt adds to the image's features."""


@dataclass(frozen=True)
class WarmupPlan:
    """The batch sizes and lengths a runner warms up (``serve --warmup``) and ``tune`` compiles: the same plan."""

    sizes: tuple[int, ...]
    prompt_length: int
    max_new_tokens: int

    @classmethod
    def of(cls, num_visual_features: int, *, batch: int, max_new_tokens: int) -> WarmupPlan:
        """Every power of two up to ``batch`` (and ``batch``), a prompt of one image and some text; ``batch`` and
        ``max_new_tokens`` as the runner caps them (its batch limit, its default max_tokens)."""
        sizes = tuple(sorted({min(2 ** i, batch) for i in range(batch.bit_length() + 1)}))
        return cls(sizes, num_visual_features + WARMUP_PROMPT_EXTRA, max_new_tokens)


class WarmStart(BaseModel):
    """How a runner's start went with respect to tune artifacts (shown in /health)."""

    warm: bool = False
    """Whether a matching tune artifact was loaded before the warm-up."""
    reason: str = "no tune artifact looked up"
    artifact: str | None = None
    """``MODEL#BUILD sha256`` of the loaded artifact."""
    warmup_seconds: float | None = None
    compile_cache: dict[str, int] = {}
    """Inductor's FX graph cache hits and misses of the warm-up (a warm start hits, a cold one misses)."""
    precompiled: list[str] = []
    """The buckets (``BATCHxLENGTH``) whose decode step was loaded compiled ahead of time: not traced at all."""


def engine_key(engine: Any, plan: WarmupPlan, fingerprint: str) -> TuneKey | None:
    """The key a tune artifact must have to warm this engine's start, or None if its decode step is not compiled."""
    import torch

    decoder = engine.compiled_decoder
    if decoder is None:
        return None
    if decoder.device.type == "cuda":
        index = decoder.device.index if decoder.device.index is not None else torch.cuda.current_device()
        device = torch.cuda.get_device_name(index)
        capability = "{}.{}".format(*torch.cuda.get_device_capability(index))
    else:
        device, capability = "cpu", platform.machine()
    return TuneKey(fingerprint=fingerprint, device=device, capability=capability, torch=torch.__version__,
                   triton=versions(("triton",)).get("triton"), compile_mode=decoder.mode,
                   buckets=tuple(sorted(decoder.buckets(plan.sizes, plan.prompt_length, plan.max_new_tokens))))


def compile_counters() -> dict[str, int]:
    """Inductor's FX graph cache hits and misses so far in this process, and the graphs Dynamo traced."""
    from torch._dynamo.utils import counters

    inductor = counters["inductor"]
    return {"fxgraph_cache_hit": int(inductor["fxgraph_cache_hit"]),
            "fxgraph_cache_miss": int(inductor["fxgraph_cache_miss"]),
            "graphs_traced": int(counters["stats"]["unique_graphs"])}


CACHES_NAME = "compile-caches.bin"


def bundle(caches: bytes, steps: dict[tuple[int, int], bytes]) -> bytes:
    """The tune artifact's bytes: the compile caches and each bucket's step package, in a zip archive."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr(CACHES_NAME, caches)
        for (batch, length), data in sorted(steps.items()):
            archive.writestr(f"steps/{batch}x{length}.bin", data)
    return buffer.getvalue()


def unbundle(data: bytes) -> tuple[bytes, dict[tuple[int, int], bytes]]:
    """The compile caches and step packages of a tune artifact (an earlier vlmforge's: the caches alone)."""
    if not zipfile.is_zipfile(io.BytesIO(data)):
        return data, {}
    steps: dict[tuple[int, int], bytes] = {}
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        caches = archive.read(CACHES_NAME)
        for name in archive.namelist():
            if name.startswith("steps/") and name.endswith(".bin"):
                batch, length = name.removeprefix("steps/").removesuffix(".bin").split("x")
                steps[(int(batch), int(length))] = archive.read(name)
    return caches, steps


@dataclass
class TuneResult:
    """What one tune run compiled and saved."""

    key: TuneKey
    data: bytes
    artifacts: dict[str, int]
    warmup_seconds: float
    compile_cache: dict[str, int]


def tune_engine(engine: Any, plan: WarmupPlan, fingerprint: str, *, precompile: bool = False) -> TuneResult:
    """Warm up ``engine`` as a runner would (``plan``) and collect torch's compile caches of it; with ``precompile``,
    also each bucket's step compiled ahead of time (:mod:`vlmforge.runner.precompile`)."""
    import torch

    key = engine_key(engine, plan, fingerprint)
    if key is None:
        raise DeployError("nothing to tune: this engine's decode step is not compiled here (the static decode path "
                          "compiles on a GPU; on the CPU pass --compile, with --decode static)")
    started = time.perf_counter()
    engine.warmup(plan.sizes, plan.prompt_length, plan.max_new_tokens)
    seconds = time.perf_counter() - started
    counters = compile_counters()
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        raise DeployError("torch saved no compile caches after the warm-up (torch.compiler.save_cache_artifacts() "
                          "returned None): check that Inductor's caches are on (TORCHINDUCTOR_FX_GRAPH_CACHE)")
    caches, info = saved
    artifacts = {kind: len(entries) for kind, entries in info.artifacts.items() if entries}
    steps: dict[tuple[int, int], bytes] = {}
    if precompile:
        try:
            steps = engine.compiled_decoder.compile_packages()
        except Exception as exc:
            raise DeployError(f"--precompile: the decode steps could not be compiled ahead of time ({type(exc).__name__}"
                              f": {exc}); tune without --precompile to store the compile caches alone") from exc
        artifacts["precompiled_step"] = len(steps)
    return TuneResult(key, bundle(caches, steps), artifacts, seconds, counters)


def load_tune(engine: Any, engine_dir: Path, plan: WarmupPlan, store_url: str | None) -> WarmStart:
    """Before the warm-up: load the tune artifact of this build that matches this machine, if there is one.

    Never raises for a tune artifact's sake: no store, no pulled build, no match or a damaged blob are warnings (or
    a note, where there is nothing to look up) and the warm-up compiles as without one."""
    if engine.compiled_decoder is None:
        return WarmStart(reason="the decode step is not compiled: nothing to warm")
    from vlmforge.store.engine_dir import read_marker

    manifest = read_marker(engine_dir)
    if manifest is None:
        log.info("%s was not pulled from a store: no tune artifact looked up; compiling", engine_dir)
        return WarmStart(reason="the engine directory was not pulled from a store")
    key = engine_key(engine, plan, manifest.fingerprint)
    assert key is not None
    try:
        return _load(engine, manifest, key, store_url)
    except Exception as exc:  # noqa: BLE001 - a tune artifact never fails a start
        log.warning("tune artifact of %s not used (%s); compiling as on a cold start", manifest.ref, exc)
        return WarmStart(reason=f"not used: {exc}")


def _load(engine: Any, manifest: Any, key: TuneKey, store_url: str | None) -> WarmStart:
    import torch

    from vlmforge.store import open_store

    with open_store(store_url) as store:
        records: Sequence[TuneRecord] = store.tune_records(manifest)
        record, differences = newest_matching(list(records), key)
        if record is None:
            why = ("no tune artifact of this build in " + store.url if not records else
                   f"no tune artifact of this build matches this machine (closest: {'; '.join(differences)})")
            log.warning("%s: %s; compiling as on a cold start (run `vlmforge tune %s` here to store one)",
                        manifest.ref, why, manifest.ref)
            return WarmStart(reason=why)
        data = store.read_tune(record)  # IntegrityError for a damaged blob
    caches, steps = unbundle(data)
    torch.compiler.load_cache_artifacts(caches)
    if steps:
        engine.compiled_decoder.preload(steps)
    log.info("loaded the tune artifact of %s for %s (%d bytes, %d precompiled steps, tuned %s)", manifest.ref,
             key.device, len(data), len(steps), f"{record.created_at:%Y-%m-%d %H:%M}")
    return WarmStart(warm=True, reason="a matching tune artifact was loaded",
                     artifact=f"{record.ref} {record.sha256[:12]}")
