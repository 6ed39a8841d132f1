"""The hf toolchain's stages, each doing real work with torch and transformers.

convert (cast and re-save the checkpoint) -> quantize (decoder-only LLMs: int8/int4 weights on torch's low-bit
kernels, or ModelOpt's calibrated fake quantization) -> LLM engine
(the standalone language model) and, beside it, the visual engine (vision encoder + projector
exported to ONNX, checked in ONNX Runtime against torch) -> assemble (engine.json) -> validate
(the runner against the unconverted float32 reference).

Each function takes its inputs' directories and writes into an output directory it is given; it
knows nothing of fingerprints or Prefect (see :mod:`vlmforge.build.pipeline`).
"""

from __future__ import annotations

import json
import logging
import shutil
import statistics
import threading
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from vlmforge.artifacts.engine_config import (
    HF_CHECKPOINT_DIR,
    EngineConfig,
    HfCheckpointInfo,
    LlmEngineInfo,
    VisualEngineInfo,
)
from vlmforge.errors import BuildError, SourceError, SpecError, ToolchainUnavailable, ValidationFailed
from vlmforge.families import ResolvedSpec
from vlmforge.sources.base import link_or_copy
from vlmforge.toolchains.hf.export_gate import EXPORT_GATE, beside_exports
from vlmforge.toolchains.quantize.hf import QuantizeResult
from vlmforge.toolchains.quantize.whole import WholeModelExport

log = logging.getLogger(__name__)



def check_supported(resolved: ResolvedSpec) -> None:
    """Refuse, before any work, what the hf toolchain cannot build."""
    from vlmforge.toolchains.quantize.hf import check_hf_quantization

    family = resolved.family
    if not family.hf_supported:
        raise ToolchainUnavailable(family.hf_unsupported_reason
                                   or f"the hf toolchain cannot build {family.name}: use --toolchain trtllm")
    check_hf_quantization(resolved)


def _torch_dtype(name: str) -> Any:
    from vlmforge.modeling.devices import torch_dtype

    return torch_dtype(name)


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


_LOADING = threading.Lock()
"""transformers' from_pretrained is not thread-safe (its lazy imports and its meta-device init patch module
globals: two concurrent loads leave parameters on the meta device), and the flow runs the visual stage
beside convert: loads and the ONNX export (which traces through the same globals) take turns. Lock order:
:data:`EXPORT_GATE` first, then this lock."""


def _load_model(resolved: ResolvedSpec, model_dir: Path, dtype: Any, device: str = "cpu") -> Any:
    missing = resolved.family.missing_processor_files(model_dir)
    if missing:
        raise SourceError(f"missing processor files in {model_dir}: {', '.join(missing)}")
    try:
        with _LOADING:
            return resolved.family.load_model(model_dir, dtype, device=device)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise SourceError(f"cannot load the checkpoint in {model_dir}: {type(exc).__name__}: {exc}") from None


def _load_processor(resolved: ResolvedSpec, model_dir: Path) -> Any:
    with _LOADING:
        return resolved.family.load_processor(model_dir)


def read_config(model_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise SourceError(f"unreadable config.json in {model_dir}: {exc}") from None


class ConvertResult(BaseModel):
    dtype: str
    num_visual_features: int
    num_attention_heads: int
    bytes: int


@beside_exports
def convert(resolved: ResolvedSpec, source_dir: Path, out: Path, *, device: str = "cpu") -> ConvertResult:
    """Load with transformers, check the architecture facts, cast to the spec's dtype, save safetensors + processor."""
    from vlmforge.toolchains.hf.saving import safetensors_size, save_pretrained_as

    spec, family = resolved.spec, resolved.family
    facts = family.checkpoint_facts(source_dir, read_config(source_dir))
    checks = (("num_visual_features", facts.num_visual_features), ("num_attention_heads", facts.num_attention_heads))
    for field, actual in checks:
        declared = getattr(spec.architecture, field)
        if declared is not None and declared != actual:
            raise SpecError(f"the spec says {declared} but the checkpoint's config.json gives {actual}: fix the spec",
                            path=f"architecture.{field}")
    family.check_checkpoint_config(spec, read_config(source_dir))
    if not family.size_dependent_tokens and resolved.derived.num_visual_features != facts.num_visual_features:
        raise SpecError(
            f"num_visual_features is {resolved.derived.num_visual_features} (family default) but the checkpoint has "
            f"{facts.num_visual_features}: set architecture.num_visual_features: {facts.num_visual_features}",
            path="architecture.num_visual_features",
        )
    if facts.num_attention_heads % spec.parallel.tp:
        raise SpecError(f"tp={spec.parallel.tp} does not divide the checkpoint's {facts.num_attention_heads} heads",
                        path="parallel.tp")
    model = _load_model(resolved, source_dir, _torch_dtype("float32"), device)
    target = out / "checkpoint"
    save_pretrained_as(model, target, _torch_dtype(spec.dtype.value))
    family.save_processor(_load_processor(resolved, source_dir), source_dir, target)
    return ConvertResult(dtype=spec.dtype.value, num_visual_features=facts.num_visual_features,
                         num_attention_heads=facts.num_attention_heads, bytes=safetensors_size(target))


@beside_exports
def quantize(resolved: ResolvedSpec, checkpoint_dir: Path, out: Path, *, device: str = "cpu") -> QuantizeResult:
    """The LLM quantized as the hf runner serves it (:mod:`vlmforge.toolchains.quantize.hf`)."""
    from vlmforge.toolchains.quantize.hf import quantize_for_hf

    return quantize_for_hf(resolved, checkpoint_dir, out, device=device)


class LlmResult(BaseModel):
    format: str
    architecture: str
    bytes: int


@beside_exports
def build_llm(resolved: ResolvedSpec, checkpoint_dir: Path, quantized: tuple[Path, QuantizeResult] | None, out: Path, *,
              device: str = "cpu") -> LlmResult:
    """The LLM engine: the standalone language model (or the quantize stage's form of it) plus the processor."""
    from vlmforge.toolchains.hf.saving import safetensors_size, save_pretrained_as

    spec, family = resolved.spec, resolved.family
    target = out / "llm"
    if quantized is not None:
        quantized_dir, result = quantized
        shutil.copytree(quantized_dir / "llm", target)
        fmt = result.format
    else:
        dtype = _torch_dtype(spec.dtype.value)
        llm = family.extract_llm(_load_model(resolved, checkpoint_dir, dtype, device))
        save_pretrained_as(llm, target, dtype)
        fmt = "safetensors"
    family.save_processor(_load_processor(resolved, checkpoint_dir), checkpoint_dir, out / "processor")
    # the saved LLM's own class (a family whose llm_class is transformers' Auto class serves several)
    architecture = (read_config(target).get("architectures") or [family.llm_class().__name__])[0]
    return LlmResult(format=fmt, architecture=architecture, bytes=safetensors_size(target))


class VisualResult(BaseModel):
    exporter: str
    precision: str
    output_shape: list[int | str]
    max_abs_error: float
    max_rel_error: float
    max_rel_to_scale: float
    bytes: int


def build_visual(resolved: ResolvedSpec, source_dir: Path, out: Path) -> VisualResult:
    # The export traces on the CPU in float32: ONNX Runtime's CPU provider checks it, and TensorRT's
    # builder takes the same file and chooses its own precision.
    """Export the vision encoder + projector to ONNX and check ONNX Runtime against torch on the golden images."""
    import torch

    from vlmforge.toolchains.hf.onnx import OnnxRunError, compare_onnx, export_onnx

    family = resolved.family
    model = _load_model(resolved, source_dir, torch.float32)
    processor = _load_processor(resolved, source_dir)
    module = family.visual_module(model).eval()
    images = family.golden_images()
    if family.visual_engine_axes:
        return _build_visual_feeds(resolved, model, processor, module, images, out)
    pixels = family.visual_inputs(processor, images).pixels  # anyres families: every image's tiles
    checks, example = [pixels[:1], pixels], pixels[:2]
    dynamic = family.dynamic_spatial_axes
    if dynamic:  # traced and checked at a second size too: ONNX Runtime must take both
        size = family.spatial_check_size
        if size is None:
            raise BuildError(f"{family.name} declares dynamic_spatial_axes but no spatial_check_size to check them at")
        other = family.pixel_values(processor, [image.resize((size.width, size.height)) for image in images])
        checks.append(other)
        example = other[:2]
    target = out / "vision" / "model.onnx"
    # the export holds the process's torch work off (export_gate) and traces through transformers' registries too
    with EXPORT_GATE.exclusive(), _LOADING:
        info = export_onnx(module, target, example, dynamic_spatial=dynamic)
    try:
        errors = [compare_onnx(target, module, batch) for batch in checks]
    except OnnxRunError as exc:  # e.g. an export whose spatial axes came out fixed
        raise BuildError(f"visual engine check failed ({info.exporter} export): {exc}") from None
    worst = {key: max(err[key] for err in errors) for key in ("max_abs", "max_rel", "max_rel_to_scale")}
    if worst["max_rel_to_scale"] > family.logit_scale_tolerance:
        raise BuildError(
            f"visual engine check failed: ONNX Runtime differs from torch by {worst['max_rel_to_scale']:.2e} of the "
            f"output scale (tolerance {family.logit_scale_tolerance:.0e})"
        )
    family.save_visual_extras(model, target.parent)
    with torch.no_grad():
        shape: list[int | str] = list(module(pixels[:1]).shape)
    if dynamic:
        shape[1] = "tokens"  # as many as the image's size gives
    return VisualResult(exporter=info.exporter, precision="float32", output_shape=["batch", *shape[1:]],
                        max_abs_error=worst["max_abs"], max_rel_error=worst["max_rel"],
                        max_rel_to_scale=worst["max_rel_to_scale"], bytes=target.stat().st_size)


def _build_visual_feeds(resolved: ResolvedSpec, model: Any, processor: Any, module: Any, images: list[Any],
                        out: Path) -> VisualResult:
    """:func:`build_visual` for a visual engine of several inputs (Qwen2-VL: rows, rope, mask): exported on every
    golden image at once and checked in ONNX Runtime against torch on each image alone and on all together (other
    row counts than the export's: the dynamic axes are proven)."""
    from vlmforge.toolchains.hf.onnx import OnnxRunError, compare_onnx_feed, export_onnx_feeds

    family = resolved.family
    target = out / "vision" / "model.onnx"
    target.parent.mkdir(parents=True, exist_ok=True)
    family.save_visual_extras(model, target.parent)
    extras = family.load_visual_extras(target.parent)
    inputs = family.visual_inputs(processor, images)
    together = family.visual_engine_feeds(inputs, len(images), extras)
    alone = [feed for i in range(len(images))
             for feed in family.visual_engine_feeds(inputs.select([i]), 1, extras) or []]
    if not together or not alone:
        raise BuildError(f"{family.name} declares visual_engine_axes but feeds its visual engine nothing")
    with EXPORT_GATE.exclusive(), _LOADING:
        info = export_onnx_feeds(module, target, together[0], family.visual_engine_axes)
    try:
        errors = [compare_onnx_feed(target, module, feed) for feed in alone + together]
    except OnnxRunError as exc:
        raise BuildError(f"visual engine check failed ({info.exporter} export): {exc}") from None
    worst = {key: max(err[key] for err in errors) for key in ("max_abs", "max_rel", "max_rel_to_scale")}
    if worst["max_rel_to_scale"] > family.logit_scale_tolerance:
        raise BuildError(
            f"visual engine check failed: ONNX Runtime differs from torch by {worst['max_rel_to_scale']:.2e} of the "
            f"output scale (tolerance {family.logit_scale_tolerance:.0e})"
        )
    import torch

    with torch.no_grad():
        hidden = int(module(*alone[0].values()).shape[-1])
    return VisualResult(exporter=info.exporter, precision="float32", output_shape=["tokens", hidden],
                        max_abs_error=worst["max_abs"], max_rel_error=worst["max_rel"],
                        max_rel_to_scale=worst["max_rel_to_scale"], bytes=target.stat().st_size)


def whole_model_folder(checkpoint_dir: Path, out: Path, dtype: str) -> HfCheckpointInfo:
    """The whole model as a Hugging Face folder in ``out/hf`` (``artifacts.hf_checkpoint``), hard-linked from the
    convert stage's ``checkpoint/`` (no bytes copied where links work): the float folder of an unquantized spec, the
    model this build validates (a quantized spec's is :func:`unified_model_folder`)."""
    shutil.copytree(checkpoint_dir, out / HF_CHECKPOINT_DIR, copy_function=link_or_copy)
    architectures = read_config(out / HF_CHECKPOINT_DIR).get("architectures") or [None]
    return HfCheckpointInfo(path=HF_CHECKPOINT_DIR, architecture=architectures[0], dtype=dtype)


def unified_model_folder(quantized_dir: Path, out: Path, export: WholeModelExport) -> HfCheckpointInfo:
    """The quantize stage's unified export of the whole model (``quantized_dir/hf``) as ``out/hf``, hard-linked."""
    shutil.copytree(quantized_dir / HF_CHECKPOINT_DIR, out / HF_CHECKPOINT_DIR, copy_function=link_or_copy)
    return HfCheckpointInfo(path=HF_CHECKPOINT_DIR, architecture=export.architecture, dtype=export.dtype,
                            kind="unified", quant_algo=export.quant_algo,
                            kv_cache_quant_algo=export.kv_cache_quant_algo)


def assemble(resolved: ResolvedSpec, visual_dir: Path, visual: VisualResult, llm_dir: Path, llm: LlmResult,
             checkpoint_dir: Path, out: Path, quantized: tuple[Path, QuantizeResult] | None = None) -> EngineConfig:
    """Lay out the engine directory (vision/, llm/, processor/, engine.json; hf/ with ``artifacts.hf_checkpoint``),
    hard-linking stage outputs. ``checkpoint_dir``: the convert stage's cast checkpoint of the whole model (hf/ of an
    unquantized spec); ``quantized``: the quantize stage's directory and result (hf/ of a quantized spec: its
    unified export)."""
    spec, derived = resolved.spec, resolved.derived
    folder = None
    if spec.artifacts.hf_checkpoint:
        export = quantized[1].hf_checkpoint if quantized is not None else None
        if spec.quantization.active and (quantized is None or export is None):
            raise BuildError("a quantized spec with artifacts.hf_checkpoint needs the quantize stage's unified export "
                             "of the whole model: rerun the build (its quantize stage is older than the option)")
        folder = (unified_model_folder(quantized[0], out, export) if quantized is not None and export is not None
                  else whole_model_folder(checkpoint_dir, out, spec.dtype.value))
    for src_root, names in ((visual_dir, ("vision",)), (llm_dir, ("llm", "processor"))):
        for name in names:
            shutil.copytree(src_root / name, out / name, copy_function=link_or_copy)
    config = EngineConfig(
        name=spec.name, family=spec.family, toolchain="hf", world_size=derived.world_size, tp=spec.parallel.tp,
        pp=spec.parallel.pp, max_batch_size=spec.limits.max_batch_size, max_input_len=derived.max_input_len,
        max_output_len=derived.max_output_len, num_visual_features=derived.num_visual_features,
        max_images_per_prompt=derived.max_images_per_prompt, processor="processor",
        visual=VisualEngineInfo(path="vision/model.onnx", format="onnx", precision=visual.precision,
                                max_batch_size=derived.visual_max_batch_size, output_shape=visual.output_shape),
        llm=LlmEngineInfo(path="llm", format=llm.format, dtype=spec.dtype.value,  # type: ignore[arg-type]
                          quantization=spec.quantization.method.value,
                          kv_cache_dtype=spec.quantization.kv_cache_dtype.value, architecture=llm.architecture),
        hf_checkpoint=folder,
    )
    config.write(out)
    return config


class GoldenResult(BaseModel):
    prompt: str | None
    reference_tokens: list[int]
    engine_tokens: list[int]
    agreement: float
    max_logit_error: float
    engine_text: str
    images: int = Field(default=1, exclude_if=lambda value: value == 1)
    """Golden images in the request (left out at 1: one-image reports read as before)."""


class ValidationReport(BaseModel):
    """Greedy agreement and logit error against the float32 reference, and the runner's profile."""

    passed: bool
    token_agreement: float
    max_logit_error: float
    min_token_agreement: float
    max_logit_error_allowed: float
    vision_ms: float
    llm_ms: float
    e2e_ms: float
    max_new_tokens: int
    inputs: list[GoldenResult]


@beside_exports
def validate(resolved: ResolvedSpec, engine_dir: Path, source_dir: Path, *, device: str | None = None) -> ValidationReport:
    """Run the engine through the deployment runner on the golden inputs against the float32 reference."""
    import torch

    from vlmforge.modeling.generation import compare_generations
    from vlmforge.runner.engine import HfEngine

    spec, family, derived = resolved.spec, resolved.family, resolved.derived
    engine = HfEngine(engine_dir, device=device)
    reference = _load_model(resolved, source_dir, torch.float32, engine.device)
    processor = _load_processor(resolved, source_dir)
    text = spec.validation.input_text if spec.validation.input_text is not None else family.golden_prompt
    steps = derived.max_new_tokens
    golden = family.golden_images()
    engine.generate(golden[0], text, 1)  # warm-up, not profiled
    inputs: list[Any] = list(golden)
    several = min(derived.max_images_per_prompt, len(golden))
    if several > 1:  # a spec for several images per prompt is validated on a request that carries them
        inputs.append(golden[:several])
    results, profiles = [], []
    for image in inputs:
        count = len(image) if isinstance(image, list) else 1
        ref = family.reference_generate(reference, processor, image, family.format_prompt(text, count), steps)
        got = engine.generate(image, text, steps)
        comparison = compare_generations(ref, got)  # type: ignore[arg-type]  # Generation has tokens and logits
        results.append(GoldenResult(prompt=family.format_prompt(text, count), reference_tokens=list(ref.tokens),
                                    engine_tokens=got.tokens, agreement=comparison.token_agreement,
                                    max_logit_error=comparison.prefix_logit_error,
                                    engine_text=got.text, images=count))
        if count == 1:  # the profile compares one-image requests across specs
            profiles.append(got)
    agreement = statistics.fmean(r.agreement for r in results)
    error = max(r.max_logit_error for r in results)
    threshold = spec.validation
    report = ValidationReport(
        passed=agreement >= threshold.min_token_agreement and error <= threshold.max_logit_error,
        token_agreement=round(agreement, 4), max_logit_error=round(error, 6),
        min_token_agreement=threshold.min_token_agreement, max_logit_error_allowed=threshold.max_logit_error,
        vision_ms=round(statistics.fmean(p.vision_ms for p in profiles), 3),
        llm_ms=round(statistics.fmean(p.llm_ms for p in profiles), 3),
        e2e_ms=round(statistics.fmean(p.e2e_ms for p in profiles), 3),
        max_new_tokens=steps, inputs=results,
    )
    if not report.passed:
        raise ValidationFailed(
            f"validation failed for {spec.name}: token agreement {report.token_agreement:.3f} (need >= "
            f"{threshold.min_token_agreement}), max logit error {report.max_logit_error:.4f} (allowed <= "
            f"{threshold.max_logit_error}); nothing is published"
        )
    return report
