"""The 1.2 plans' checkpoint step: ``vlmforge checkpoint`` with the flags that reproduce the spec's quantization.

One function writes the argv (plans) and the CLI reads it back (``vlmforge checkpoint``), so the step and the
command cannot drift apart (tests/contract parses every plan's argv with the CLI itself). What each LLM kind's
checkpoint writer can produce is said here too, so a plan is refused before any work when it cannot be built.
"""

from __future__ import annotations

import posixpath

from vlmforge.errors import PlanError
from vlmforge.plans.model import Layout
from vlmforge.specs.schema import CALIBRATION_SYNTHETIC, BuildSpec, KvCacheDtype, QuantMethod

WEIGHT_ONLY = frozenset({QuantMethod.NONE, QuantMethod.INT8_WO, QuantMethod.INT4_WO})

CHECKPOINT_METHODS: dict[str, frozenset[QuantMethod]] = {
    "llama": frozenset(QuantMethod),
    "opt": WEIGHT_ONLY,
}
"""LLM kind (``ModelFamily.llm_kind``) -> what ``vlmforge checkpoint`` writes for it. LLaMA-type LLMs go through
ModelOpt's exporter (every format); OPT has no ModelOpt exporter and TensorRT-LLM's OPT converter writes only
weight-only formats, which vlmforge's own converter mirrors."""

CHECKPOINT_KV: dict[str, bool] = {"llama": True, "opt": False}
"""LLM kind -> whether its checkpoint can carry a quantized KV cache's scales."""

CHECKPOINT_PP: dict[str, bool] = {"llama": True, "opt": False}
"""LLM kind -> pipeline parallelism (TensorRT-LLM's OPT converter asserts pp_size == 1)."""


def check_checkpoint_support(spec: BuildSpec, llm_kind: str) -> None:
    """Refuse, before any work, a checkpoint the writer for ``llm_kind`` cannot produce."""
    quant = spec.quantization
    methods = CHECKPOINT_METHODS.get(llm_kind)
    if methods is None:
        raise PlanError(f"vlmforge checkpoint has no writer for {llm_kind} LLMs")
    if quant.method not in methods:
        allowed = ", ".join(m.value for m in QuantMethod if m in methods)
        raise PlanError(
            f"quantization.method {quant.method.value}: a TensorRT-LLM checkpoint of a {llm_kind} LLM can be {allowed} "
            f"(NVIDIA ModelOpt has no {llm_kind} exporter and TensorRT-LLM's own {llm_kind} converter writes weight-only "
            "formats only); the hf toolchain builds every format for it"
        )
    if quant.kv_cache_dtype is not KvCacheDtype.AUTO and not CHECKPOINT_KV.get(llm_kind, False):
        raise PlanError(f"quantization.kv_cache_dtype {quant.kv_cache_dtype.value}: TensorRT-LLM's {llm_kind} converter "
                        "writes no KV-cache scales; set kv_cache_dtype: auto")
    if spec.parallel.pp > 1 and not CHECKPOINT_PP.get(llm_kind, False):
        raise PlanError(f"parallel.pp {spec.parallel.pp}: TensorRT-LLM has no pipeline parallelism for {llm_kind} LLMs "
                        "(its converter asserts pp_size == 1); use parallel.tp")


def checkpoint_report(layout: Layout) -> str:
    """Where a plan's checkpoint step writes its result (the read-back's figures), for the build's manifest: outside
    trt_models/, which goes once the engine is built."""
    return posixpath.join(layout.workspace, "reports", layout.name, layout.variant, layout.gpus_label, "checkpoint.json")


def checkpoint_argv(spec: BuildSpec, model_dir: str, out_dir: str, report: str | None = None) -> list[str]:
    """``vlmforge checkpoint --family F --out OUT ... -- MODEL_DIR``: only what differs from the command's defaults;
    values that are paths as ``--opt=value`` and the positional after ``--``, so none can pass for an option."""
    quant = spec.quantization
    argv = ["vlmforge", "checkpoint", "--family", spec.family, f"--out={out_dir}", "--dtype", spec.dtype.value]
    if report is not None:
        argv.append(f"--report={report}")
    if quant.method is not QuantMethod.NONE:
        argv += ["--quant", quant.method.value]
    if quant.kv_cache_dtype is not KvCacheDtype.AUTO:
        argv += ["--kv-cache-dtype", quant.kv_cache_dtype.value]
    if quant.method.grouped and quant.method is not QuantMethod.INT4_WO:  # TensorRT-LLM's int4_wo is per channel
        argv += ["--group-size", str(quant.group_size)]
    if quant.needs_calibration:
        calibration = quant.calibration
        if calibration.source != CALIBRATION_SYNTHETIC:
            argv.append(f"--calib-source={calibration.source}")
        argv += ["--calib-size", str(calibration.size), "--calib-batch-size", str(calibration.batch_size)]
        if calibration.seed:
            argv += ["--calib-seed", str(calibration.seed)]
    if spec.parallel.tp > 1:
        argv += ["--tp", str(spec.parallel.tp)]
    if spec.parallel.pp > 1:
        argv += ["--pp", str(spec.parallel.pp)]
    threshold = spec.validation.max_logit_error
    if threshold != type(spec.validation).model_fields["max_logit_error"].default:
        argv += ["--max-logit-error", repr(threshold)]
    return argv + ["--", model_dir]
