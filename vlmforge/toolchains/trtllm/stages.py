"""The trtllm toolchain's stages after its plan ran: lay out the engine (engine.json, processor) and validate it.

Validation mirrors the hf toolchain's (:func:`vlmforge.toolchains.hf.stages.validate`): the engine through the
runner on the golden inputs against the unconverted float32 reference, greedy, judged by the spec's
``validation`` thresholds with :mod:`vlmforge.modeling.generation`'s comparisons. One difference is said plainly
in every report: TensorRT-LLM's multimodal runner returns text, not logits (engines are built without
``--gather_generation_logits``), so for such an engine the reference's text is re-tokenized as the runner's is,
token agreement is enforced, and ``max_logit_error`` is recorded as not measured. An engine that returns logits
is judged on both thresholds, as on the hf path.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from vlmforge.artifacts.engine_config import EngineConfig, LlmEngineInfo, VisualEngineInfo
from vlmforge.errors import ValidationFailed
from vlmforge.families import ResolvedSpec
from vlmforge.toolchains.trtllm.runtime import GeneratingEngine

NO_LOGITS = ("not measured: TensorRT-LLM's multimodal runner returns text, not logits; token agreement is "
             "compared on the reference's text re-tokenized as the runner's")


def assemble(resolved: ResolvedSpec, engine_dir: Path, hf_dir: Path, *, trtllm_version: str, tensorrt_version: str | None,
             compute_capability: str) -> EngineConfig:
    """Complete the plan's engine directory (llm/, vision/) with processor/ and engine.json."""
    spec, derived, family = resolved.spec, resolved.derived, resolved.family
    family.load_processor(hf_dir).save_pretrained(engine_dir / "processor")
    config = EngineConfig(
        name=spec.name, family=spec.family, toolchain="trtllm", world_size=derived.world_size, tp=spec.parallel.tp,
        pp=spec.parallel.pp, max_batch_size=spec.limits.max_batch_size, max_input_len=derived.max_input_len,
        max_output_len=derived.max_output_len, num_visual_features=derived.num_visual_features,
        max_images_per_prompt=derived.max_images_per_prompt, processor="processor",
        visual=VisualEngineInfo(path="vision", format="tensorrt", precision="float16",
                                max_batch_size=derived.visual_max_batch_size,
                                output_shape=["batch", derived.num_visual_features, "hidden"]),
        llm=LlmEngineInfo(path="llm", format="tensorrt", dtype=spec.dtype.value,
                          quantization=spec.quantization.method.value, architecture=family.llm_kind),
        tensorrt_version=tensorrt_version, tensorrt_llm_version=trtllm_version, compute_capability=compute_capability,
    )
    config.write(engine_dir)
    return config


class GoldenComparison(BaseModel):
    """One golden input: the reference's and the engine's tokens and how they agree."""

    prompt: str | None
    reference_tokens: list[int]
    engine_tokens: list[int]
    agreement: float
    max_logit_error: float | None
    """None where the engine returned no logits."""
    engine_text: str


class TrtllmValidationReport(BaseModel):
    """Greedy agreement (and logit error where measurable) against the float32 reference."""

    passed: bool
    token_agreement: float
    max_logit_error: float | None
    """None: not measured (see ``logit_check``)."""
    min_token_agreement: float
    max_logit_error_allowed: float
    logit_check: str
    """"compared", or why the spec's max_logit_error could not be checked."""
    vision_ms: float | None
    """None: TensorRT-LLM's runner times the whole request, not its parts."""
    llm_ms: float | None
    e2e_ms: float
    max_new_tokens: int
    inputs: list[GoldenComparison]


def validate(resolved: ResolvedSpec, engine: GeneratingEngine, hf_dir: Path, *, device: str) -> TrtllmValidationReport:
    """Run ``engine`` on the golden inputs against the float32 reference; raise ValidationFailed below threshold."""
    import torch

    from vlmforge.modeling.generation import compare_generations, compare_tokens

    spec, family, derived = resolved.spec, resolved.family, resolved.derived
    reference = family.load_model(hf_dir, torch.float32, device=device)
    processor = family.load_processor(hf_dir)
    tokenizer = processor.tokenizer
    text = spec.validation.input_text if spec.validation.input_text is not None else family.golden_prompt
    steps = derived.max_new_tokens
    golden = family.golden_images()  # the hf toolchain's too
    engine.generate(golden[0], text, 1)  # warm-up, not timed
    results: list[GoldenComparison] = []
    timings: list[float] = []
    for image in golden:
        ref = family.reference_generate(reference, processor, image, family.format_prompt(text), steps)
        got = engine.generate(image, text, steps)
        timings.append(got.e2e_ms)
        if got.logits.numel():  # raw tokens and their logits: judged as on the hf path
            full = compare_generations(ref, got)  # type: ignore[arg-type]  # Generation has tokens and logits
            ref_tokens, agreement, error = list(ref.tokens), full.token_agreement, full.prefix_logit_error
        else:
            ref_tokens = _as_runner_tokens(tokenizer, ref.tokens)
            agreement, error = compare_tokens(ref_tokens, got.tokens).token_agreement, None
        results.append(GoldenComparison(prompt=family.format_prompt(text), reference_tokens=ref_tokens,
                                        engine_tokens=list(got.tokens), agreement=agreement, max_logit_error=error,
                                        engine_text=got.text))
    return judge(resolved, results, timings)


def _as_runner_tokens(tokenizer: Any, tokens: list[int]) -> list[int]:
    """The reference's tokens as TensorRT-LLM's runner reports its own: the text, special tokens dropped,
    tokenized again."""
    return list(tokenizer(tokenizer.decode(tokens, skip_special_tokens=True), add_special_tokens=False).input_ids)


def judge(resolved: ResolvedSpec, results: list[GoldenComparison], timings: list[float]) -> TrtllmValidationReport:
    """The report of the golden comparisons against the spec's thresholds; raises when they are not met."""
    spec = resolved.spec
    threshold = spec.validation
    agreement = statistics.fmean(r.agreement for r in results)
    errors = [r.max_logit_error for r in results]
    error = max(errors) if all(e is not None for e in errors) else None  # type: ignore[type-var]
    logits_ok = error is None or error <= threshold.max_logit_error
    report = TrtllmValidationReport(
        passed=agreement >= threshold.min_token_agreement and logits_ok,
        token_agreement=round(agreement, 4), max_logit_error=None if error is None else round(error, 6),
        min_token_agreement=threshold.min_token_agreement, max_logit_error_allowed=threshold.max_logit_error,
        logit_check="compared" if error is not None else NO_LOGITS,
        vision_ms=None, llm_ms=None, e2e_ms=round(statistics.fmean(timings), 3),
        max_new_tokens=resolved.derived.max_new_tokens, inputs=results,
    )
    if not report.passed:
        logits = (f"max logit error {report.max_logit_error:.4f} (allowed <= {threshold.max_logit_error})"
                  if error is not None else f"max logit error {NO_LOGITS}")
        raise ValidationFailed(
            f"validation failed for {spec.name}: TensorRT engine token agreement {report.token_agreement:.3f} (need >= "
            f"{threshold.min_token_agreement}), {logits}; nothing is published"
        )
    return report
