"""Contract: every flag a plan emits exists in the real argparse of that release (tests/contract/trtllm_flags.json)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from vlmforge.errors import VlmforgeError
from vlmforge.plans.model import DIALECTS, Plan, Step
from vlmforge.specs.catalog import catalog_entry, catalog_names
from vlmforge.specs.schema import Dialect, merge_overrides, spec_from_dict
from vlmforge.toolchains.trtllm.plan import build_plan

TABLE = json.loads(Path(__file__).with_name("trtllm_flags.json").read_text())
VARIANTS: list[dict[str, Any]] = [
    {},
    {"quantization.method": "int8_wo"},
    {"quantization.method": "int4_wo"},
    {"quantization.method": "int4_awq"},
    {"quantization.method": "int8_sq"},
    {"quantization.method": "fp8", "quantization.kv_cache_dtype": "fp8"},
    {"quantization.kv_cache_dtype": "int8"},
    {"parallel.tp": 2},
    {"parallel.tp": 2, "parallel.pp": 2},
    {"limits.max_batch_size": 4, "visual.max_batch_size": 8, "limits.max_beam_width": 2},
    {"dtype": "bfloat16"},
]


def all_plans() -> list[tuple[str, Plan]]:
    plans = []
    for model, dialect, variant in itertools.product(catalog_names(), Dialect, VARIANTS):
        try:
            spec = spec_from_dict(merge_overrides(catalog_entry(model), variant))
            plans.append((f"{model}-{dialect.value}-{variant}", build_plan(spec, dialect=dialect)))
        except VlmforgeError:
            continue  # refused before any work: that is the other tests' business
    return plans


PLANS = all_plans()


def trtllm_steps(plan: Plan) -> list[Step]:
    return [step for step in plan.steps if step.tool == "trtllm-build" or step.tool.startswith("examples/")]


def flags_of(argv: list[str], many: frozenset[str] = frozenset()) -> list[tuple[str, str | None]]:
    """(flag, value) pairs; a flag in ``many`` (argparse nargs '+') takes every value up to the next flag."""
    start = next(i for i, token in enumerate(argv) if token == "trtllm-build" or token.endswith(".py")) + 1
    pairs, index = [], start
    while index < len(argv):
        token = argv[index]
        assert token.startswith("--"), f"stray positional {token!r} in {argv}"
        index += 1
        values = []
        while index < len(argv) and not argv[index].startswith("--") and (token in many or not values):
            values.append(argv[index])
            index += 1
        if token in many:
            assert values, f"{token} takes one value or more in {argv}"
            pairs += [(token, value) for value in values]
        else:
            pairs.append((token, values[0] if values else None))
    return pairs


def nargs_many(script: dict[str, Any]) -> frozenset[str]:
    """The script's flags that take one value or more (argparse nargs '+')."""
    return frozenset(flag for flag, detail in script.get("details", {}).items() if detail.get("nargs") == "+")


def test_many_plans_are_checked() -> None:
    assert len(PLANS) > 150
    assert {plan.dialect for _, plan in PLANS} == set(Dialect)


@pytest.mark.parametrize("dialect", list(Dialect), ids=lambda d: d.value)
def test_every_flag_exists_in_the_release(dialect: Dialect) -> None:
    scripts = TABLE["dialects"][dialect.value]["scripts"]
    checked = 0
    for label, plan in PLANS:
        if plan.dialect is not dialect:
            continue
        for step in trtllm_steps(plan):
            assert step.tool in scripts, f"{label}: {step.tool} is not a script of {dialect.value}"
            known = set(scripts[step.tool]["flags"])
            choices = scripts[step.tool].get("choices", {})
            for flag, value in flags_of(step.argv, nargs_many(scripts[step.tool])):
                assert flag in known, f"{label}: {step.tool} has no {flag} in TensorRT-LLM {dialect.value}"
                allowed = choices.get(flag)
                if isinstance(allowed, dict):
                    allowed = allowed.get("help_says")
                if allowed and value is not None:
                    assert value in allowed, f"{label}: {step.tool} {flag} {value!r} not in {allowed}"
                checked += 1
    assert checked > 500


@pytest.mark.parametrize("dialect", list(Dialect), ids=lambda d: d.value)
def test_scripts_live_where_the_release_has_them(dialect: Dialect) -> None:
    info = DIALECTS[dialect]
    assert info.release == TABLE["dialects"][dialect.value]["tag"]
    for _, plan in PLANS:
        if plan.dialect is dialect:
            for step in trtllm_steps(plan):
                if step.tool != "trtllm-build":
                    script = next(token for token in step.argv if token.endswith(".py"))
                    resolved = Path(info.multimodal_dir, script).as_posix()
                    assert Path(resolved).resolve().relative_to(Path.cwd().resolve()).as_posix() == step.tool


def test_the_table_knows_the_removed_flags() -> None:
    old, new = (set(TABLE["dialects"][d]["scripts"]["trtllm-build"]["flags"]) for d in ("0.9", "1.2"))
    assert {"--max_output_len", "--enable_xqa", "--use_custom_all_reduce"} <= old - new
    assert {"--max_seq_len", "--kv_cache_type"} <= new


def test_a_flag_the_release_lacks_is_caught() -> None:
    known = set(TABLE["dialects"]["1.2"]["scripts"]["trtllm-build"]["flags"])
    assert "--max_output_len" not in known and "--max_seq_len" in known
