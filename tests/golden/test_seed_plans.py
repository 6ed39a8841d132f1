"""Golden tests: dialect 0.9 plans reproduce the seed README's commands exactly, paths aside."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.helpers.seed import SEED, normalize, parse_blocks
from vlmforge.plans.model import Plan
from vlmforge.specs.catalog import catalog_entry
from vlmforge.specs.schema import Dialect, merge_overrides, spec_from_dict
from vlmforge.toolchains.trtllm.plan import build_plan

BLOCKS = parse_blocks()


END_OF_OPTIONS = (["git", "clone"], ["sed", "-i"])
"""The second deliberate deviation from the seed: vlmforge ends these commands' options with `--`, so a URL or path
can never read as an option (issue 11: `git clone --upload-pack=...` from a spec's code_source)."""


def with_end_of_options(cmd: list[str]) -> list[str]:
    """A seed command as vlmforge writes it: `git clone -- URL DIR`, `sed -i -- SCRIPT FILE`; others unchanged."""
    for head in END_OF_OPTIONS:
        if cmd[: len(head)] == head:
            return head + ["--"] + cmd[len(head):]
    return cmd


def seed_commands(*indexes: int) -> list[list[str]]:
    return [with_end_of_options(cmd) for index in indexes for cmd in BLOCKS[index].commands]


def plan_for(model: str, overrides: dict[str, Any] | None = None) -> Plan:
    return build_plan(spec_from_dict(merge_overrides(catalog_entry(model), overrides or {})), dialect=Dialect.V0_9)


def step_argvs(plan: Plan, names: list[str]) -> list[list[str]]:
    by_name = {step.name: step.argv for step in plan.steps}
    return [by_name[name] for name in names]


def assert_same(seed: list[list[str]], ours: list[list[str]]) -> None:
    assert len(seed) == len(ours)
    for expected, actual in zip(seed, ours):
        assert normalize(actual) == normalize(expected), f"\nseed: {expected}\nours: {actual}"


# (case, model, overrides, spec keys to drop, seed blocks, plan steps)
CASES = [
    ("blip2-t5", "flan-t5-xl", {}, (), [0, 1, 2, 3],
     ["fetch", "convert", "build-encoder", "build-decoder", "build-visual", "validate"]),
    ("blip2-opt-int4", "opt-2.7b", {"quantization.method": "int4_wo"}, (), [5], ["convert", "build-llm"]),
    ("llava-fp16", "llava-1.5-7b-hf", {}, (), [6, 8, 10], ["fetch", "convert", "build-llm", "validate"]),
    ("llava-visual", "llava-1.5-7b-hf", {}, (), [], []),  # checked below: first line of block 9
    ("llava-int4-wo", "llava-1.5-7b-hf",
     {"quantization.method": "int4_wo", "limits.max_input_len": 1024, "limits.max_output_len": 100}, (), [11],
     ["convert", "build-llm"]),
    ("llava-int4-awq", "llava-1.5-7b-hf",
     {"quantization.method": "int4_awq", "limits.max_input_len": 1024, "limits.max_output_len": 100}, (), [12],
     ["quantize", "build-llm"]),
    ("nougat", "nougat-base", {}, ("validation.max_new_tokens",), [13, 14, 15],
     ["fetch", "convert", "build-decoder", "build-visual", "validate"]),
    ("llava-tp2", "llava-1.5-7b-hf", {"parallel.tp": 2, "limits.use_fused_mlp": False},
     ("validation.input_text",), [16], ["convert", "build-llm", "build-visual", "validate"]),
]


@pytest.mark.parametrize("case", [c for c in CASES if c[4]], ids=lambda c: c[0])
def test_plan_reproduces_seed(case) -> None:
    _, model, overrides, drop, blocks, steps = case
    plan = plan_for(model, {**overrides, **dict.fromkeys(drop)})  # None: the catalog key removed
    assert_same(seed_commands(*blocks), step_argvs(plan, steps))


def test_llava_and_vila_visual_builds() -> None:
    llava, vila = BLOCKS[9].commands
    assert_same([llava], step_argvs(plan_for("llava-1.5-7b-hf"), ["build-visual"]))
    assert_same([vila], step_argvs(plan_for("vila-7B"), ["build-visual"]))


def test_vila_fetch_and_source_patches() -> None:
    plan = plan_for("vila-7B")
    names = [step.name for step in plan.steps]
    assert names[:5] == ["fetch-code", "fetch", "patch-delay-load", "patch-attention-mask", "patch-seqlens"]
    assert_same(seed_commands(7), step_argvs(plan, names[:5]))
    # LLaVA's engine commands (block 8) are VILA's too, paths aside.
    assert_same(seed_commands(8), step_argvs(plan, ["convert", "build-llm"]))


def test_vila_run_uses_its_prompt() -> None:
    (run,) = BLOCKS[10].commands
    expected = [("Please describe the traffic condition." if t == "Question: which city is this? Answer:" else t) for t in run]
    assert_same([expected], step_argvs(plan_for("vila-7B"), ["validate"]))


def test_blip2_opt_matches_seed_but_sizes_the_visual_engine() -> None:
    """The one deliberate deviation: the seed's visual engine keeps its builder's batch of 4 while the
    LLM takes 8 (NVIDIA/TensorRT-LLM#928); vlmforge passes --max_batch_size 8 to the visual builder."""
    plan = plan_for("opt-2.7b")
    fetch, convert, build, visual, run = seed_commands(4)
    assert_same([fetch, convert, build, run], step_argvs(plan, ["fetch", "convert", "build-llm", "validate"]))
    assert_same([visual + ["--max_batch_size", "8"]], step_argvs(plan, ["build-visual"]))
    with pytest.raises(Exception, match="visual engine's batch \\(4"):
        plan_for("opt-2.7b", {"visual.max_batch_size": None})


def test_tp2_run_has_the_mpirun_prefix() -> None:
    validate = next(step for step in plan_for("llava-1.5-7b-hf", {"parallel.tp": 2}).steps if step.name == "validate")
    assert validate.argv[:4] == ["mpirun", "-n", "2", "--allow-run-as-root"]
    assert validate.gpus == 2


def test_every_seed_command_is_covered() -> None:
    """Each seed block is used by a test above (so a seed edit cannot go unnoticed)."""
    used = {index for case in CASES for index in case[4]} | {7, 9, 10, 4}
    assert used == set(range(len(BLOCKS)))


def test_seed_copy_matches_shared_seed() -> None:
    shared = Path(__file__).resolve().parents[3] / "shared" / "seed" / SEED.name.replace("seed-multimodal", "tensorrt-llm-multimodal")
    if not shared.exists():
        pytest.skip("shared/seed is not beside this checkout")
    assert shared.read_text() == SEED.read_text()


def test_comparison_sees_a_changed_value_and_a_missing_flag() -> None:
    (build,) = [cmd for cmd in BLOCKS[4].commands if cmd[0] == "trtllm-build"]
    changed = [("16" if token == "8" else token) for token in build]
    assert normalize(changed) != normalize(build)
    assert normalize(build[:-2]) != normalize(build)
    assert normalize(build[:2] + ["/elsewhere"] + build[3:]) == normalize(build)  # paths aside


def test_only_clone_and_sed_gain_an_end_of_options_marker() -> None:
    changed = [cmd for block in BLOCKS for cmd in block.commands if with_end_of_options(cmd) != cmd]
    assert changed and {tuple(cmd[:2]) for cmd in changed} == {("git", "clone"), ("sed", "-i")}
    assert all("--" not in cmd for block in BLOCKS for cmd in block.commands)  # the seed itself has none
