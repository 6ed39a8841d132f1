"""``vlmforge tune``: on the target machine, load a build's engine as a runner would, warm up the buckets the runner
warms, and store torch's compile caches beside the build (:mod:`vlmforge.runner.tune`, :mod:`vlmforge.store.tune`).

Every refusal (a TensorRT engine, a decode path that does not compile here, an engine directory that names no
published build) comes before anything is pulled, loaded or compiled.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from vlmforge.artifacts.engine_config import EngineConfig
from vlmforge.deploy.service import RUNNER_LEAVES_OUT
from vlmforge.deploy.sources import default_cache_dir
from vlmforge.errors import DeployError
from vlmforge.runner import CompileMode, DecodeMode
from vlmforge.store.tune import TuneRecord

log = logging.getLogger(__name__)


class TuneOptions(BaseModel):
    """How the runner that the tune artifact is for will load and warm up (the same options as ``serve``)."""

    device: str | None = None
    decode: DecodeMode = DecodeMode.AUTO
    compile_mode: CompileMode = CompileMode.MAX_AUTOTUNE
    compile: bool | None = None
    max_batch_size: int | None = None
    max_tokens: int | None = None
    precompile: bool = False
    """Also store each bucket's step compiled ahead of time (vlmforge.runner.precompile)."""


class TuneOutcome(BaseModel):
    """What ``tune`` stored, and how the warm-up that made it went."""

    ref: str
    store: str
    engine_dir: str
    record: TuneRecord
    compile_cache: dict[str, int]


def _check_options(options: TuneOptions) -> str:
    """The device the engine will load on; a DeployError if its decode step would not be compiled there."""
    import torch

    device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if options.decode is DecodeMode.DYNAMIC:
        raise DeployError("--decode dynamic compiles nothing: tune the static decode path (--decode auto or static)")
    if options.compile is False or (not device.startswith("cuda") and options.compile is not True):
        raise DeployError(f"the static decode step is compiled on a GPU only by default, and this tune runs on "
                          f"{device}: tune on the GPU that will serve, or pass --compile (with --decode static) to "
                          "tune for the CPU")
    if not device.startswith("cuda") and options.decode is not DecodeMode.STATIC:
        raise DeployError("on the CPU the decode path is dynamic unless asked: pass --decode static with --compile")
    return device


def tune(target: str, *, store_url: str | None = None, options: TuneOptions | None = None,
         cache_dir: Path | None = None) -> TuneOutcome:
    """Tune ``target`` (an engine directory pulled from the store, or ``MODEL``, ``MODEL@ALIAS``, ``MODEL#BUILD``,
    pulled into the deploy cache like ``deploy`` does) and store its tune artifact in ``store_url``."""
    from vlmforge.runner.loader import LoadOptions, load_engine
    from vlmforge.runner.tune import WarmupPlan, tune_engine
    from vlmforge.store import open_store
    from vlmforge.store.engine_dir import read_marker

    options = options or TuneOptions()
    path = Path(target)
    with open_store(store_url) as store:
        if path.is_dir():
            config = EngineConfig.read(path)
            manifest = read_marker(path)
            if manifest is None:
                raise DeployError(f"{path} names no published build (no .vlmforge-manifest.json): tune artifacts are "
                                  "stored beside a build; publish it and tune MODEL, MODEL@ALIAS or MODEL#BUILD_ID "
                                  "(or a directory `vlmforge store pull` made)")
            stored = store.resolve(manifest.ref)
            if stored.fingerprint != manifest.fingerprint:
                raise DeployError(f"{path} holds {manifest.ref} of fingerprint {manifest.fingerprint[:12]}, but "
                                  f"{store.url} has {stored.fingerprint[:12]} under that id: tune from that store")
        else:
            manifest = store.resolve(target)
            config = None
        if (config.toolchain if config else manifest.toolchain) != "hf":
            raise DeployError(f"{manifest.ref} is a TensorRT engine: TensorRT compiles it at build time, there is "
                              "nothing for torch to tune")
        device = _check_options(options)
        if config is None:
            path = (cache_dir or default_cache_dir()) / manifest.model / manifest.build_id
            store.pull(manifest.ref, path, exclude=RUNNER_LEAVES_OUT)
        url = store.url
    engine: Any = load_engine(path, LoadOptions(device=device, decode=options.decode, compile_mode=options.compile_mode,
                                                compile=options.compile, max_batch_size=options.max_batch_size))
    limits = engine.limits
    plan = WarmupPlan.of(engine.config.num_visual_features, batch=limits.max_batch_size,
                         max_new_tokens=min(options.max_tokens or limits.max_output_len, limits.max_output_len))
    log.info("tuning %s on %s: batch sizes %s, prompt %d, %d new tokens", manifest.ref, device, list(plan.sizes),
             plan.prompt_length, plan.max_new_tokens)
    result = tune_engine(engine, plan, manifest.fingerprint, precompile=options.precompile)
    with open_store(store_url) as store:
        record = store.publish_tune(manifest, result.key, result.data, warmup_seconds=round(result.warmup_seconds, 3),
                                    artifacts=result.artifacts)
    return TuneOutcome(ref=manifest.ref, store=url, engine_dir=str(path), record=record,
                       compile_cache=result.compile_cache)
