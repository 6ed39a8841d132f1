"""The trtllm toolchain's build plan: a resolved spec and a dialect in, ordered argv steps out (pure)."""

from __future__ import annotations

import posixpath

from vlmforge.families import resolve
from vlmforge.plans.model import DIALECTS, Layout, Plan, PlanContext, PlanRequirements, variant_label
from vlmforge.specs.schema import BuildSpec, Dialect


def build_plan(spec: BuildSpec, *, dialect: Dialect | None = None, workspace: str = "/workspace",
               image: str | None = None) -> Plan:
    """Resolve a spec and write the trtllm plan for it in ``dialect`` (default: the spec's)."""
    if dialect is not None and dialect != spec.dialect:
        spec = spec.model_copy(update={"dialect": dialect})
    info = DIALECTS[spec.dialect]
    resolved = resolve(spec, visual_builder_default_batch=info.visual_builder_default_batch)
    family = resolved.family
    family.check_dialect(spec, info)
    world = resolved.derived.world_size
    layout = Layout(
        workspace=workspace,
        name=spec.name,
        variant=variant_label(spec),
        gpus_label=f"{world}-gpu",
        code_dir=posixpath.join(workspace, "hf_models", family.code_dir_name) if family.needs_code_source else "",
    )
    ctx = PlanContext(spec=spec, derived=resolved.derived, dialect=info, layout=layout, image=image or info.image)
    steps = family.trtllm_steps(ctx)
    engine_dir = layout.engine_dir
    return Plan(
        spec=spec,
        derived=resolved.derived,
        dialect=spec.dialect,
        requirements=PlanRequirements(
            min_compute_capability=resolved.derived.min_compute_capability,
            gpus=max(step.gpus for step in steps),
            tensorrt_llm=info.release,
        ),
        steps=steps,
        engine_dir=engine_dir,
    )


