"""``vlmforge checkpoint``: the TensorRT-LLM checkpoint that ``trtllm-build --checkpoint_dir`` takes, written and
verified on any machine with torch (a GPU only makes calibration faster).

calibration set (checked first) -> VLM in float -> golden and calibration prefixes through the family's hooks ->
reference logits -> ModelOpt calibration (where the format has any) -> export (ModelOpt, or vlmforge's OPT
converter) -> config.json checked against TensorRT-LLM 1.2's fields -> read back and compared: with the quantized
torch model (does the checkpoint encode what was calibrated?) and with the float32 reference (the accuracy gate).
"""

from __future__ import annotations

import logging
import shutil
import time
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from vlmforge.errors import BuildError, SpecError, ValidationFailed
from vlmforge.families import ResolvedSpec
from vlmforge.plans.checkpoint import check_checkpoint_support
from vlmforge.specs.schema import QuantMethod

log = logging.getLogger(__name__)

READBACK_TOLERANCE = 0.01
"""Largest read-back vs quantized-model logit difference, relative to the reference's logit scale. A layout or
packing error moves logits by the scale itself. The quantized model is compared as the checkpoint holds it: pre-quant
scales rounded as stored, int8/FP8 weights rounded as the exporter rounds them (the fake-quant forward rounds ties
differently, and activation quantization turns one such code into percents of the scale), KV-cache quantizers off
(KV-cache quantization happens in the engine's attention). What remains of a right checkpoint is then float
arithmetic: up to 0.03 % of the scale on the tiny models."""


class CheckpointFile(BaseModel):
    name: str
    bytes: int


class CheckpointVerification(BaseModel):
    """The checkpoint read back (TP and layout undone, dequantized) and run on the golden prefixes."""

    readback_vs_quantized: Any
    """Against the quantized torch model (ModelOpt's fake-quant after export; for W8A16/W4A16, the float model with
    trtllm-build's per-channel rounding): does the checkpoint encode what was calibrated?"""
    readback_vs_reference: Any
    """Against the float32 reference: what the quantization costs."""
    quantized_vs_reference: Any
    tolerance: float
    """Allowed readback_vs_quantized.max_error (READBACK_TOLERANCE x the reference's logit scale)."""
    max_logit_error_allowed: float
    """The spec's validation.max_logit_error, applied to readback_vs_reference.next_token_error."""
    kv_cache_scales: dict[str, float]
    simulated: list[str]
    """What the read-back computes like the engine: activation quantization, build-time weight rounding."""


class CheckpointKind(StrEnum):
    """What ``vlmforge checkpoint`` writes."""

    TRTLLM = "trtllm"
    """TensorRT-LLM's checkpoint: config.json + rank{N}.safetensors, for trtllm-build --checkpoint_dir."""
    UNIFIED = "unified"
    """ModelOpt's unified Hugging Face checkpoint (export_hf_checkpoint): what TensorRT-LLM's PyTorch backend, vLLM
    and SGLang load; the LLM alone, not split."""


class CheckpointResult(BaseModel):
    """What ``vlmforge checkpoint`` wrote and how it verified."""

    kind: CheckpointKind = CheckpointKind.TRTLLM
    writer: str
    """modelopt (ModelOpt's TensorRT-LLM exporter), opt (vlmforge's converter, after TensorRT-LLM's) or
    modelopt-hf (ModelOpt's unified exporter)."""
    method: str
    quant_algo: str | None
    kv_cache_quant_algo: str | None
    dtype: str
    tp: int
    pp: int
    files: list[CheckpointFile]
    bytes: int
    calibration: dict[str, Any] | None
    calibrate_seconds: float
    export_seconds: float
    modelopt: str | None
    config_checked_against: str
    verification: CheckpointVerification


def check_unified(spec: Any) -> None:
    """What a unified checkpoint cannot hold, refused before any work."""
    from vlmforge.modeling.unified import UNIFIED_KV, UNIFIED_METHODS

    quant = spec.quantization
    if quant.method not in UNIFIED_METHODS:
        raise SpecError(f"a unified checkpoint holds ModelOpt's calibrated formats ({', '.join(m.value for m in UNIFIED_METHODS)}); "
                        f"{quant.method.value} is a TensorRT-LLM build-time format: write --kind trtllm", path="quantization.method")
    if quant.kv_cache_dtype not in UNIFIED_KV:
        raise SpecError("ModelOpt's unified exporter writes FP8 KV caches only: set kv_cache_dtype fp8 or auto",
                        path="quantization.kv_cache_dtype")
    if spec.parallel.tp != 1 or spec.parallel.pp != 1:
        raise SpecError("a unified checkpoint is not split (its loader shards it): set parallel.tp and pp to 1",
                        path="parallel.tp")


def write_checkpoint(resolved: ResolvedSpec, model_dir: Path, out: Path, *, device: str | None = None,
                     kind: CheckpointKind = CheckpointKind.TRTLLM) -> CheckpointResult:
    """Write and verify the checkpoint (TensorRT-LLM's, or the unified one) of ``resolved``'s LLM from the model
    checkpoint in ``model_dir``."""
    import torch

    from vlmforge.modeling import modelopt as mo
    from vlmforge.modeling.trtllm.config import config_problems, quant_config_problems
    from vlmforge.modeling.trtllm.export import export_modelopt, writer_for
    from vlmforge.modeling.trtllm.opt import export_opt
    from vlmforge.modeling.trtllm.readback import read_back
    from vlmforge.modeling.unified import cast_unified, export_unified, prepare_unified, read_back_unified
    from vlmforge.toolchains.quantize.calibration import calibration_set, golden_set, llm_batches
    from vlmforge.toolchains.quantize.llm import (
        batch_logits, check_groups, compare_logits, standalone_llm,
    )

    spec, family = resolved.spec, resolved.family
    quant = spec.quantization
    tp, pp = spec.parallel.tp, spec.parallel.pp
    if family.encoder_decoder:
        raise SpecError(f"{family.name}: encoder-decoder checkpoints are written by TensorRT-LLM's enc_dec "
                        "convert_checkpoint.py in NVIDIA's container (vlmforge plan shows the command)", path="family")
    if kind is CheckpointKind.UNIFIED:
        check_unified(spec)
    else:
        check_checkpoint_support(spec, family.llm_kind)
    if spec.dtype.value == "float32":
        raise SpecError("TensorRT-LLM checkpoints are written in float16 or bfloat16", path="dtype")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise BuildError(f"{out} is not empty: vlmforge checkpoint writes into a new or empty directory")
    calibration = calibration_set(quant.calibration, family) if quant.needs_calibration else None
    modelopt_version = mo.require_modelopt() if quant.needs_calibration or family.llm_kind != "opt" else None
    unified = kind is CheckpointKind.UNIFIED
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")

    dtype = torch.float32  # the reference, calibration and the read-back all in float32, also on a GPU
    model = family.load_model(Path(model_dir), dtype, device=device)
    processor = family.load_processor(Path(model_dir))
    llm = standalone_llm(family, model)
    writer = "modelopt-hf" if unified else writer_for(llm.config.model_type)
    check_groups(llm, quant.method, quant.group_size, tp)
    heads = llm.config.num_attention_heads
    if heads % tp:
        raise SpecError(f"tp={tp} does not divide the LLM's {heads} attention heads", path="parallel.tp")
    if llm.config.num_hidden_layers % pp:
        raise SpecError(f"pp={pp} does not divide the LLM's {llm.config.num_hidden_layers} layers", path="parallel.pp")

    text = spec.validation.input_text
    golden = llm_batches(family, model, processor, llm, golden_set(family, text), batch_size=len(golden_set(family)))
    calib = llm_batches(family, model, processor, llm, calibration.samples, quant.calibration.batch_size) if calibration else []
    reference = batch_logits(llm, golden)

    start = time.perf_counter()
    if calibration is not None:
        mo.calibrate(llm, quant.method, quant.kv_cache_dtype, quant.group_size, calib)
    calibrate_seconds = time.perf_counter() - start
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    quantized = None
    if unified:
        prepare_unified(llm)
        mo.round_weights_as_exported(llm)
        with mo.kv_cache_quantizers_off(llm):
            quantized = batch_logits(llm, golden)  # the unified export packs the weights in place: run it first
        config = {"quantization": export_unified(llm, out)["quantization"]}
    elif writer == "modelopt":
        config = export_modelopt(llm, out, dtype=spec.dtype.value, tp=tp, pp=pp, method=quant.method,
                                 kv_cache=quant.kv_cache_dtype)
    else:
        config = export_opt(llm, out, dtype=spec.dtype.value, tp=tp, pp=pp, method=quant.method)
    export_seconds = time.perf_counter() - start

    problems = quant_config_problems(config["quantization"]) if unified else config_problems(
        config, world_size=len(list(out.glob("rank*.safetensors"))))
    if problems:
        raise BuildError(f"{out}: the checkpoint's config would not load: " + "; ".join(problems))

    if quantized is None:  # the TensorRT-LLM export leaves a model that runs: compared with as it is after it
        quantized = _quantized_model_logits(llm, quant.method, tp, spec.dtype.value, golden,
                                            calibrated=calibration is not None)
    readback = (read_back_unified if unified else read_back)(out, llm.config, type(llm), device)
    read = batch_logits(readback.model, golden)
    vs_quantized = compare_logits(read, quantized, golden)
    if unified:  # verified in float32 (exact); now stored in the spec's dtype, and read back again for the gate
        cast_unified(out, spec.dtype.value)
        readback = read_back_unified(out, llm.config, type(llm), device)
        read = batch_logits(readback.model, golden)
    simulated = []
    if readback.activations:
        simulated.append(f"activation quantization of {len(readback.activations)} linears")
    if quant.method.weight_only:
        simulated.append("trtllm-build's per-channel weight rounding, per rank")
    if quant.kv_cache_dtype.value != "auto" and not readback.kv_scales:
        raise BuildError(f"{out}: a {quant.kv_cache_dtype.value} KV cache was asked for but the checkpoint holds no "
                         "KV-cache scaling factors")
    vs_reference = compare_logits(read, reference, golden)
    verification = CheckpointVerification(
        readback_vs_quantized=vs_quantized, readback_vs_reference=vs_reference,
        quantized_vs_reference=compare_logits(quantized, reference, golden),
        tolerance=round(READBACK_TOLERANCE * max(vs_reference.scale, 1.0), 6),
        max_logit_error_allowed=spec.validation.max_logit_error,
        kv_cache_scales=readback.kv_scales, simulated=simulated,
    )
    quantization = config.get("quantization") or {}
    files = sorted(p for p in out.iterdir() if p.is_file())
    result = CheckpointResult(
        kind=kind, writer=writer, method=quant.method.value, quant_algo=quantization.get("quant_algo"),
        kv_cache_quant_algo=quantization.get("kv_cache_quant_algo"), dtype=spec.dtype.value, tp=tp, pp=pp,
        files=[CheckpointFile(name=f.name, bytes=f.stat().st_size) for f in files],
        bytes=sum(f.stat().st_size for f in files), calibration=calibration.describe() | {
            "size": quant.calibration.size, "batch_size": quant.calibration.batch_size,
        } if calibration else None,
        calibrate_seconds=round(calibrate_seconds, 3), export_seconds=round(export_seconds, 3),
        modelopt=modelopt_version, config_checked_against="TensorRT-LLM 1.2 " + ("QuantConfig" if unified else
                                                                                "PretrainedConfig/QuantConfig"),
        verification=verification,
    )
    try:
        _gate(spec, out, verification)
    except (BuildError, ValidationFailed):
        shutil.rmtree(out, ignore_errors=True)  # a checkpoint that failed its checks is not left for trtllm-build
        raise
    return result


def _gate(spec: Any, out: Path, verification: CheckpointVerification) -> None:
    vs_quantized, vs_reference = verification.readback_vs_quantized, verification.readback_vs_reference
    if vs_quantized.max_error > verification.tolerance:
        raise BuildError(
            f"the checkpoint in {out} does not read back as the quantized model: logits differ by "
            f"{vs_quantized.max_error:.4f} (allowed {verification.tolerance:.4f}); it is not what was calibrated, "
            "and it was removed"
        )
    if vs_reference.next_token_error > spec.validation.max_logit_error:
        raise ValidationFailed(
            f"{spec.name} {spec.quantization.method.value}: the checkpoint's next-token logits differ from the float32 "
            f"reference by {vs_reference.next_token_error:.4f} (validation.max_logit_error "
            f"{spec.validation.max_logit_error}); it was removed: calibrate on more or better data, pick another "
            "format, or relax the threshold"
        )


def _quantized_model_logits(llm: Any, method: QuantMethod, tp: int, dtype: str, batches: list[dict[str, Any]], *,
                            calibrated: bool) -> list[Any]:
    """Logits of the quantized torch model as the checkpoint holds it: ModelOpt's fake-quant LLM after the export,
    its pre-quant scales rounded to ``dtype`` as stored, its int8/FP8 weights rounded as the exporter rounds them
    (:func:`~vlmforge.modeling.modelopt.round_weights_as_exported`) and its KV-cache quantizers off (the engine's attention
    quantizes the KV cache; the read-back does not); for the weight-only formats (fp16 weights in the checkpoint),
    a copy with trtllm-build's per-channel rounding per rank."""
    import copy

    import torch

    from vlmforge.modeling import modelopt as mo
    from vlmforge.modeling.trtllm.readback import simulate_weight_only
    from vlmforge.toolchains.quantize.llm import batch_logits

    model = llm
    if method.weight_only:
        model = copy.deepcopy(llm)
        simulate_weight_only(model, 8 if method is QuantMethod.INT8_WO else 4, tp, dtype)
    if not calibrated:
        return batch_logits(model, batches)
    mo.round_pre_quant_scales(model, getattr(torch, dtype))
    mo.round_weights_as_exported(model)
    with mo.kv_cache_quantizers_off(model):
        return batch_logits(model, batches)
