"""Warm starts: the static decode path's compile caches, saved after a warm-up on one machine (``vlmforge tune``) and
loaded before the warm-up of the next runner on a machine of the same kind.

``torch.compiler.save_cache_artifacts()`` returns torch's portable caches (Inductor's FX graph cache with its
bundled Triton kernels, autotuning results, AOTAutograd entries) of what this process compiled;
``load_cache_artifacts`` puts them into this process's cache directories, so the compiles that follow hit them
instead of tracing, autotuning and compiling kernels again. They are valid only for the same engine, GPU (or CPU
architecture), torch and Triton versions, compile mode and buckets: :class:`~vlmforge.store.tune.TuneKey`. A start
never fails because of a tune artifact: any mismatch, absence or damage is a warning and an ordinary cold compile.
"""

from __future__ import annotations

import logging
import platform
import time
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
    """Inductor's FX graph cache hits and misses so far in this process."""
    from torch._dynamo.utils import counters

    inductor = counters["inductor"]
    return {"fxgraph_cache_hit": int(inductor["fxgraph_cache_hit"]),
            "fxgraph_cache_miss": int(inductor["fxgraph_cache_miss"])}


@dataclass
class TuneResult:
    """What one tune run compiled and saved."""

    key: TuneKey
    data: bytes
    artifacts: dict[str, int]
    warmup_seconds: float
    compile_cache: dict[str, int]


def tune_engine(engine: Any, plan: WarmupPlan, fingerprint: str) -> TuneResult:
    """Warm up ``engine`` as a runner would (``plan``) and collect torch's compile caches of it."""
    import torch

    key = engine_key(engine, plan, fingerprint)
    if key is None:
        raise DeployError("nothing to tune: this engine's decode step is not compiled here (the static decode path "
                          "compiles on a GPU; on the CPU pass --compile, with --decode static)")
    started = time.perf_counter()
    engine.warmup(plan.sizes, plan.prompt_length, plan.max_new_tokens)
    seconds = time.perf_counter() - started
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        raise DeployError("torch saved no compile caches after the warm-up (torch.compiler.save_cache_artifacts() "
                          "returned None): check that Inductor's caches are on (TORCHINDUCTOR_FX_GRAPH_CACHE)")
    data, info = saved
    artifacts = {kind: len(entries) for kind, entries in info.artifacts.items() if entries}
    return TuneResult(key, data, artifacts, seconds, compile_counters())


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
        return _load(manifest, key, store_url)
    except Exception as exc:  # noqa: BLE001 - a tune artifact never fails a start
        log.warning("tune artifact of %s not used (%s); compiling as on a cold start", manifest.ref, exc)
        return WarmStart(reason=f"not used: {exc}")


def _load(manifest: Any, key: TuneKey, store_url: str | None) -> WarmStart:
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
    torch.compiler.load_cache_artifacts(data)
    log.info("loaded the tune artifact of %s for %s (%d bytes, tuned %s)", manifest.ref, key.device, len(data),
             f"{record.created_at:%Y-%m-%d %H:%M}")
    return WarmStart(warm=True, reason="a matching tune artifact was loaded",
                     artifact=f"{record.ref} {record.sha256[:12]}")
