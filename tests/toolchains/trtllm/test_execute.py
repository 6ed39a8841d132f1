"""Resuming a TensorRT-LLM plan: a step is skipped only when it and every step before it ran with the same
command and the same source revision (TensorRT-LLM itself cannot run here; the markers are plain files)."""

from __future__ import annotations

from pathlib import Path

from vlmforge.specs.catalog import load_model_or_spec
from vlmforge.toolchains.trtllm.execute import _marker
from vlmforge.toolchains.trtllm.plan import build_plan


def chain(plan, inputs: str) -> list[str]:  # type: ignore[no-untyped-def]
    digest, names = inputs, []
    for step in plan.steps:
        marker, digest = _marker(Path("/work"), step, digest)
        names.append(marker.name)
    return names


def test_a_new_revision_or_an_earlier_step_change_reruns_everything_after_it() -> None:
    plan = build_plan(load_model_or_spec("llava-1.5-7b-hf"))
    first = chain(plan, "sha-1")
    assert chain(plan, "sha-1") == first  # the same inputs: every step is skippable
    assert all(a != b for a, b in zip(first, chain(plan, "sha-2"), strict=True))  # a new revision: none is
    other = build_plan(load_model_or_spec("llava-1.5-7b-hf", {"quantization.method": "int4_wo"}))
    changed = next(i for i, (a, b) in enumerate(zip(plan.steps, other.steps, strict=False)) if a.argv != b.argv)
    again = chain(other, "sha-1")
    assert again[:changed] == first[:changed] and all(a != b for a, b in zip(first[changed:], again[changed:]))
