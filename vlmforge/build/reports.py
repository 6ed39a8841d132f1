"""Human reports of a build: the markdown and tables a person checks in the Prefect UI (no Prefect here)."""

from __future__ import annotations

from typing import Any

from vlmforge.build.workdir import StageOutcome
from vlmforge.specs.derived import Derived
from vlmforge.specs.schema import BuildSpec
from vlmforge.toolchains.trtllm.execute import StepRun


def stage_rows(stages: list[StageOutcome]) -> list[dict[str, Any]]:
    return [
        {
            "stage": s.record.stage,
            "status": "skipped (fingerprint unchanged)" if s.skipped else "done",
            "seconds": round(s.record.seconds, 3),
            "fingerprint": s.record.fingerprint[:12],
            "files": len(s.record.files),
            "bytes": sum(f.size for f in s.record.files),
        }
        for s in stages
    ]


def step_rows(runs: list[StepRun]) -> list[dict[str, Any]]:
    """The TensorRT-LLM plan's steps as this build ran them (a skipped step completed before, same command)."""
    return [
        {"step": r.step.name, "status": "skipped (completed before)" if r.skipped else "done",
         "seconds": round(r.seconds, 1), "log": str(r.log_path)}
        for r in runs
    ]


def _logit_error(validation: dict[str, Any]) -> str:
    if validation.get("max_logit_error") is None and validation.get("logit_check"):
        return str(validation["logit_check"])
    return f"{validation.get('max_logit_error')} (<= {validation.get('max_logit_error_allowed')})"


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(row[k]) for k in head) + " |" for row in rows]
    return "\n".join(lines)


def build_report_markdown(spec: BuildSpec, derived: Derived, stages: list[StageOutcome], published: Any) -> str:
    validation = next((s.result for s in stages if s.record.stage == "validate"), {})
    manifest = published.manifest
    lines = [
        f"# Engine build: {spec.name}",
        "",
        f"- **build**: `{manifest.model}#{manifest.build_id}` in `{published.store_url}`"
        + ("" if published.created else " (already published: nothing uploaded)"),
        f"- **fingerprint**: `{manifest.fingerprint}`",
        f"- **source**: `{manifest.source.uri}` at revision `{manifest.source.revision}`",
        f"- **family / dtype / quantization**: {spec.family} / {spec.dtype.value} / {spec.quantization.method.value}",
        f"- **derived**: num_visual_features={derived.num_visual_features}, max_multimodal_len={derived.max_multimodal_len}, "
        f"max_seq_len={derived.max_seq_len}, world_size={derived.world_size}",
        f"- **aliases**: {', '.join(f'{k} -> {v}' for k, v in published.aliases.items()) or 'none moved'}",
        "",
        "## Validation against the float32 reference",
        "",
        "| token agreement | max logit error | vision ms | LLM ms | end-to-end ms |",
        "|---|---|---|---|---|",
        f"| {validation.get('token_agreement')} (>= {validation.get('min_token_agreement')}) | "
        f"{_logit_error(validation)} | "
        f"{validation.get('vision_ms')} | {validation.get('llm_ms')} | {validation.get('e2e_ms')} |",
        "",
        "## Stages",
        "",
        _table(stage_rows(stages)),
    ]
    return "\n".join(lines)


def failure_markdown(spec: BuildSpec, stages: list[StageOutcome], exc: BaseException) -> str:
    return "\n".join([
        f"# Engine build FAILED: {spec.name}",
        "",
        f"**{type(exc).__name__}**: {exc}",
        "",
        "Nothing was published and no alias moved.",
        "",
        "## Stages completed before the failure",
        "",
        _table(stage_rows(stages)) or "none",
    ])
