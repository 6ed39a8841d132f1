"""The hf toolchain's quantize stage: the LLM as the hf runner serves it.

- int8_wo / int4_wo: real low-bit weights on torch's int8/int4 matmul kernels (:mod:`vlmforge.modeling.quantized`;
  int4 in groups of ``quantization.group_size``, as the kernels take it: TensorRT-LLM's W4A16 is per channel).
- int4_awq, w4a8_awq, int8_sq, fp8 and quantized KV caches: NVIDIA ModelOpt's fake-quant LLM, calibrated on the
  family's real prefixes (:mod:`vlmforge.toolchains.quantize.calibration`). It computes what the quantized engine
  computes, in float: the hf runner serves it so the accuracy gate sees that model, not a faster stand-in.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from vlmforge.errors import BuildError, SpecError, ToolchainUnavailable
from vlmforge.families import ResolvedSpec
from vlmforge.specs.schema import KvCacheDtype, QuantMethod
from vlmforge.toolchains.quantize.llm import LogitComparison
from vlmforge.toolchains.quantize.whole import WholeModelExport, check_whole_export

log = logging.getLogger(__name__)

LOWBIT_WEIGHTS = {QuantMethod.INT8_WO: "int8", QuantMethod.INT4_WO: "int4"}


class QuantizeResult(BaseModel):
    method: str
    kv_cache_dtype: str
    format: Literal["lowbit", "modelopt"]
    """lowbit: int8/int4 weights on torch's kernels; modelopt: ModelOpt's fake-quant LLM."""
    group_size: int | None
    bytes_before: int
    """The LLM's weights in the spec's dtype."""
    bytes_after: int
    ratio: float
    calibration: dict[str, Any] | None
    calibrate_seconds: float
    modelopt: str | None
    quantized_vs_reference: LogitComparison
    """The quantized LLM against the float32 one on the golden prefixes (before the runner's own validation)."""
    hf_checkpoint: WholeModelExport | None = Field(default=None, exclude_if=lambda value: value is None)
    """With ``artifacts.hf_checkpoint``: the whole VLM as ModelOpt's unified checkpoint in ``out/hf``
    (:mod:`vlmforge.toolchains.quantize.whole`); None (left out): no such folder."""


def check_hf_quantization(resolved: ResolvedSpec) -> None:
    """What the hf toolchain refuses before any work."""
    family, quant = resolved.family, resolved.spec.quantization
    if quant.active and not family.quantizable:
        raise SpecError(f"the hf toolchain cannot quantize {family.name}'s LLM",
                        path="quantization.method" if quant.method is not QuantMethod.NONE else "quantization.kv_cache_dtype")
    if quant.method.weight_only and quant.kv_cache_dtype is not KvCacheDtype.AUTO:
        raise ToolchainUnavailable(
            f"quantization.kv_cache_dtype {quant.kv_cache_dtype.value} with {quant.method.value}: the hf runner serves "
            "weight-only LLMs on real int8/int4 kernels with a float KV cache; quantized KV caches are served with "
            "ModelOpt's fake quantization (method none, int4_awq, w4a8_awq, int8_sq or fp8), or use --toolchain trtllm"
        )
    check_whole_export(resolved)


def calibration_digest(resolved: ResolvedSpec) -> str | None:
    """The digest of the spec's calibration set (None where nothing is calibrated): part of the stage's fingerprint."""
    from vlmforge.toolchains.quantize.calibration import calibration_set

    quant = resolved.spec.quantization
    if not quant.needs_calibration or quant.method.weight_only:
        return None
    return calibration_set(quant.calibration, resolved.family).digest


def quantize_for_hf(resolved: ResolvedSpec, model_dir: Path, out: Path, *, device: str = "cpu") -> QuantizeResult:
    """Quantize the LLM of the checkpoint in ``model_dir`` into ``out/llm`` in the format the hf runner serves."""
    import torch

    from vlmforge.modeling import modelopt as mo
    from vlmforge.modeling.devices import torch_dtype, weight_bytes
    from vlmforge.modeling.quantized import load_quantized, quantize_and_save
    from vlmforge.toolchains.hf.saving import safetensors_size
    from vlmforge.toolchains.quantize.calibration import calibration_set, golden_set, llm_batches
    from vlmforge.toolchains.quantize.llm import batch_logits, check_groups, compare_logits, standalone_llm

    spec, family = resolved.spec, resolved.family
    quant = spec.quantization
    check_hf_quantization(resolved)
    if not quant.active:
        raise BuildError("quantize was called for an unquantized spec")
    lowbit = LOWBIT_WEIGHTS.get(quant.method)
    calibration = None if lowbit else calibration_set(quant.calibration, family)
    modelopt_version = None if lowbit else mo.require_modelopt()
    dtype = torch_dtype(spec.dtype.value)

    model = family.load_model(Path(model_dir), torch.float32, device=device)
    processor = family.load_processor(Path(model_dir))
    llm = standalone_llm(family, model)
    check_groups(llm, quant.method, quant.group_size)
    golden = llm_batches(family, model, processor, llm, golden_set(family, spec.validation.input_text), batch_size=3)
    reference = batch_logits(llm, golden)
    before = weight_bytes(llm, dtype)
    target = out / "llm"
    start = time.perf_counter()
    if lowbit:
        quantize_and_save(llm, target, lowbit, group_size=quant.group_size, dtype=dtype)  # type: ignore[arg-type]
        served = load_quantized(type(llm), target, torch.float32, device)
        quantized = batch_logits(served, golden)
    else:
        assert calibration is not None
        batches = llm_batches(family, model, processor, llm, calibration.samples, quant.calibration.batch_size)
        mo.calibrate(llm, quant.method, quant.kv_cache_dtype, quant.group_size, batches)
        if spec.artifacts.hf_checkpoint:  # served as the unified export holds it: fused layers re-smoothed first
            from vlmforge.modeling.unified import prepare_unified

            prepare_unified(model)
        quantized = batch_logits(llm, golden)
        mo.save_fake_quant(llm, target, dtype)
    seconds = time.perf_counter() - start
    whole = None
    if spec.artifacts.hf_checkpoint:  # the spec rule admits calibrated formats only; after the served LLM is saved
        from vlmforge.toolchains.quantize.whole import export_whole_model

        whole = export_whole_model(resolved, model, llm, processor, golden, quantized, reference, out / "hf", device)
    after = safetensors_size(target)
    comparison = compare_logits(quantized, reference, golden)
    log.info("quantized %s LLM (%s, %s): %d -> %d bytes, next-token logit error %.4f", spec.name, quant.method.value,
             "lowbit" if lowbit else "modelopt", before, after, comparison.next_token_error)
    return QuantizeResult(
        method=quant.method.value, kv_cache_dtype=quant.kv_cache_dtype.value, format="lowbit" if lowbit else "modelopt",
        group_size=quant.group_size if quant.method.grouped else None, bytes_before=before, bytes_after=after,
        ratio=round(after / before, 4) if before else 0.0,
        calibration=calibration.describe() | {"size": quant.calibration.size,
                                               "batch_size": quant.calibration.batch_size} if calibration else None,
        calibrate_seconds=round(seconds, 3), modelopt=modelopt_version, quantized_vs_reference=comparison,
        hf_checkpoint=whole,
    )
