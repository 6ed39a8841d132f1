"""The build flow's trtllm branch: run the plan's argv steps in this (NVIDIA TensorRT-LLM) container,
then validate the TensorRT engine against the hf reference through the runner, and publish."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE

from vlmforge.artifacts.engine_config import EngineConfig, LlmEngineInfo, VisualEngineInfo
from vlmforge.build.workdir import Workdir
from vlmforge.errors import ToolchainUnavailable, ValidationFailed
from vlmforge.specs.schema import BuildSpec, Dialect
from vlmforge.system.env import require_trtllm
from vlmforge.toolchains.trtllm.execute import check_buildable, execute_plan
from vlmforge.toolchains.trtllm.plan import build_plan


@task(name="run-trtllm-plan", cache_policy=NONE, persist_result=False)
def run_plan(plan: Any, workspace: Path, logger: Any, source_revision: str) -> list[Any]:
    """The plan's steps, holding the build's GPUs in the `gpu` global concurrency limit (infra/setup-pools.sh)."""
    from prefect.concurrency.sync import concurrency

    with concurrency("gpu", occupy=plan.derived.world_size, strict=False):
        return execute_plan(plan, workspace, workspace / "logs", logger.info, inputs=source_revision)


def build_with_trtllm(spec: BuildSpec, work: Workdir, store: str | None, logger: Any,
                      expected_revision: str | None = None) -> dict[str, Any]:
    """Execute the 1.2 plan, write engine.json, validate against the hf reference, publish.

    ``expected_revision`` (the watch event's): a source that resolves to another revision is logged and
    recorded in the manifest's extra; the build goes on with what it has.
    """
    import torch

    from vlmforge.build.pipeline import engine_manifest
    from vlmforge.build.publish import publish_engine
    from vlmforge.families import resolve
    from vlmforge.modeling.images import synthetic_images
    from vlmforge.runner.trtllm import TrtllmEngine
    from vlmforge.sources import hash_tree, open_source
    from vlmforge.system.env import versions
    from vlmforge.toolchains.hf.stages import GOLDEN_IMAGE_SIZE

    resolved = resolve(spec)
    check_buildable(resolved.family)
    trtllm_version = require_trtllm()
    if spec.dialect is not Dialect.V1_2:
        raise ToolchainUnavailable("the trtllm toolchain executes dialect 1.2 plans; render 0.9 plans with "
                                   "`vlmforge plan --dialect 0.9` for older containers")
    workspace = work.root / "trtllm" / spec.name
    plan = build_plan(spec, workspace=str(workspace))
    source_revision = open_source(spec.source).resolve_revision()  # what the fetch step downloads, resolved first
    runs = run_plan(plan, workspace, logger, source_revision)
    engine_dir = Path(plan.engine_dir)
    hf_dir = workspace / "hf_models" / spec.name
    processor = engine_dir / "processor"
    resolved.family.load_processor(hf_dir).save_pretrained(processor)
    major, minor = torch.cuda.get_device_capability(0)
    derived = resolved.derived
    EngineConfig(
        name=spec.name, family=spec.family, toolchain="trtllm", world_size=derived.world_size, tp=spec.parallel.tp,
        pp=spec.parallel.pp, max_batch_size=spec.limits.max_batch_size, max_input_len=derived.max_input_len,
        max_output_len=derived.max_output_len, num_visual_features=derived.num_visual_features, processor="processor",
        visual=VisualEngineInfo(path="vision", format="tensorrt", precision="float16",
                                max_batch_size=derived.visual_max_batch_size, output_shape=["batch", derived.num_visual_features, "hidden"]),
        llm=LlmEngineInfo(path="llm", format="tensorrt", dtype=spec.dtype.value, quantization=spec.quantization.method.value,
                          architecture=resolved.family.llm_kind),
        tensorrt_version=versions(("tensorrt",)).get("tensorrt"), tensorrt_llm_version=trtllm_version,
        compute_capability=f"{major}.{minor}",
    ).write(engine_dir)

    # Validation: the TensorRT engine through the runner against the unconverted float32 reference.
    family = resolved.family
    reference = family.load_model(hf_dir, torch.float32, device="cuda")
    hf_processor = family.load_processor(hf_dir)
    engine = TrtllmEngine(engine_dir, hf_model_dir=hf_dir)
    text = spec.validation.input_text if spec.validation.input_text is not None else family.golden_prompt
    agreements = []
    for image in synthetic_images(GOLDEN_IMAGE_SIZE):
        ref = family.reference_generate(reference, hf_processor, image, family.format_prompt(text), derived.max_new_tokens)
        got = engine.generate(image, text, derived.max_new_tokens)
        ref_text = hf_processor.tokenizer.decode(ref.tokens, skip_special_tokens=True)
        ref_tokens = hf_processor.tokenizer(ref_text, add_special_tokens=False).input_ids
        n = max(len(ref_tokens), 1)
        agreements.append(sum(a == b for a, b in zip(ref_tokens, got.tokens)) / n)
    agreement = sum(agreements) / len(agreements)
    validation = {"token_agreement": agreement, "min_token_agreement": spec.validation.min_token_agreement,
                  "max_logit_error": None, "vision_ms": None, "llm_ms": None, "e2e_ms": None}
    if agreement < spec.validation.min_token_agreement:
        raise ValidationFailed(f"TensorRT engine agrees with the reference on {agreement:.3f} of tokens "
                               f"(need {spec.validation.min_token_agreement}); nothing is published")
    files = hash_tree(engine_dir)
    extra: dict[str, Any] = {}
    report = next((Path(out) for step in plan.steps if step.name == "checkpoint" for out in step.outputs
                   if out.endswith(".json")), None)
    if report is not None and report.is_file():  # vlmforge checkpoint's read-back figures
        extra["checkpoint"] = json.loads(report.read_text())
    if expected_revision is not None:
        extra["expected_revision"] = expected_revision
        if source_revision != expected_revision:
            logger.warning("%s: expected source revision %s but the source is at %s (it moved on since)",
                           spec.name, expected_revision, source_revision)
    manifest = engine_manifest(spec, resolved.derived, toolchain="trtllm", source_revision=source_revision,
                               fingerprint_parts=(plan.to_json_dict(), trtllm_version, f"{major}.{minor}"),
                               files=files, validation=validation, extra=extra)
    published = publish_engine(store, engine_dir, manifest)
    create_table_artifact([{"step": r.step.name, "seconds": round(r.seconds, 1), "skipped": r.skipped,
                            "log": str(r.log_path)} for r in runs], description=f"{spec.name}: trtllm steps")
    create_markdown_artifact(f"# TensorRT engine {spec.name}\n\n{published.summary}\n\ntoken agreement {agreement:.3f}")
    shutil.rmtree(workspace / "trt_models", ignore_errors=True)  # checkpoints are intermediate
    return {"model": spec.name, "build_id": published.manifest.build_id, "fingerprint": published.manifest.fingerprint,
            "store": published.store_url, "created": published.created, "aliases": published.aliases,
            "validation": validation, "stages": {r.step.name: f"{r.seconds:.1f}s" for r in runs}}
