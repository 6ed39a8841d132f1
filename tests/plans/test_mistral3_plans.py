"""The golden 1.2 plan of mistral3 (mistralai/Mistral-Small-3.1-24B-Instruct-2503): every argv exactly, and NVIDIA's
own CI commands for it reproduced, paths aside, with each deliberate deviation named. TensorRT-LLM 1.2's multimodal
README has no Pixtral section; its CI (tests/integration/defs/examples/test_multimodal.py, read at 0606dab9, with
defs/common.py's convert_weights) builds Mistral-Small-3.1-24B-Instruct-2503 with --model_type pixtral, the llama
converter (whose LLaMAConfig.from_hugging_face takes a mistral3 config's text_config) and these limits."""

from __future__ import annotations

from typing import Any

import pytest

from tests.helpers.seed import normalize
from vlmforge.errors import PlanError, SpecError
from vlmforge.families import get_family, resolve
from vlmforge.plans.model import Plan
from vlmforge.specs.catalog import catalog_entry
from vlmforge.specs.schema import Dialect, ImageSize, merge_overrides, spec_from_dict
from vlmforge.toolchains.trtllm.plan import build_plan

MM = "/app/tensorrt_llm/examples/models/core/multimodal"
W = "/workspace"
MODEL = "Mistral-Small-3.1-24B-Instruct-2503"
HF, CKPT = f"{W}/hf_models/{MODEL}", f"{W}/trt_models/{MODEL}/bfloat16/1-gpu"
ENGINE = f"{W}/trt_engines/{MODEL}/bfloat16/1-gpu"

GOLDEN = {
    "fetch": ["vlmforge", "fetch", "--", f"hf://mistralai/{MODEL}", HF],
    "convert": ["python", "../llama/convert_checkpoint.py", "--model_dir", HF, "--output_dir", CKPT,
                "--dtype", "bfloat16"],
    "build-llm": ["trtllm-build", "--checkpoint_dir", CKPT, "--output_dir", f"{ENGINE}/llm",
                  "--gpt_attention_plugin", "bfloat16", "--gemm_plugin", "bfloat16", "--max_batch_size", "1",
                  "--max_input_len", "6144", "--max_seq_len", "6344", "--max_num_tokens", "6144",
                  "--max_multimodal_len", "3025"],
    "build-visual": ["python", "build_multimodal_engine.py", "--model_type", "pixtral", "--model_path", HF,
                     "--output_dir", f"{ENGINE}/vision", "--max_batch_size", "1"],
    "validate": ["python", "run.py", "--max_new_tokens", "30", "--hf_model_dir", HF, "--engine_dir", ENGINE],
}

CI = {  # batch 1, bfloat16, tp 1, pp 1, one beam: _test_llm_multimodal_general's commands
    "convert": "python ../llama/convert_checkpoint.py --model_dir=M --output_dir=C --dtype=bfloat16 --tp_size=1 "
               "--pp_size=1",
    "build-llm": "trtllm-build --checkpoint_dir=C --output_dir=E/llm --gpt_attention_plugin bfloat16 "
                 "--gemm_plugin=bfloat16 --max_batch_size=1 --max_multimodal_len=5120 --max_input_len=6144 "
                 "--max_seq_len=6344 --max_num_tokens=6144 --max_beam_width=1",
    "build-visual": "python build_multimodal_engine.py --output_dir=E/vision --model_type=pixtral --model_path=M "
                    "--max_batch_size=1",
    "validate": "python run.py --engine_dir=E/ --hf_model_dir=M --max_new_tokens=30 --batch_size=1 --check_accuracy "
                "--enable_context_fmha_fp32_acc",
}


def plan_for(overrides: dict[str, Any] | None = None, dialect: Dialect = Dialect.V1_2) -> Plan:
    return build_plan(spec_from_dict(merge_overrides(catalog_entry(MODEL), overrides or {})), dialect=dialect)


def argvs(plan: Plan) -> dict[str, list[str]]:
    return {step.name: step.argv for step in plan.steps}


def as_argv(command: str) -> list[str]:
    """A CI command as argv: ``--flag=value`` split in two (argparse reads both the same)."""
    out: list[str] = []
    for token in command.split():
        out += token.split("=", 1) if token.startswith("--") and "=" in token else [token]
    return out


def test_plan_is_exact() -> None:
    plan = plan_for()
    assert [step.name for step in plan.steps] == list(GOLDEN)
    assert argvs(plan) == GOLDEN
    assert {step.cwd for step in plan.steps} == {MM}
    assert plan.requirements.tensorrt_llm == "v1.2.1" and plan.engine_dir == ENGINE


def test_plan_is_nvidia_ci_but_for_its_named_deviations() -> None:
    """Deviations, each deliberate: --max_multimodal_len 3025 (1 x the 55 x 55 [IMG] tokens of the largest image; CI's
    5120 is a round number over it); --tp_size/--pp_size 1 and --max_beam_width 1 left out (vlmforge writes them only
    above 1, as for every family); run.py without CI's --batch_size 1 (one request), --check_accuracy (CI's expected
    answer for its own images) and --enable_context_fmha_fp32_acc (a CI accuracy setting)."""
    ours = argvs(plan_for())
    dropped = {"convert": ("--tp_size", "--pp_size"), "build-llm": ("--max_beam_width",),
               "validate": ("--batch_size", "--check_accuracy", "--enable_context_fmha_fp32_acc")}
    for name, command in CI.items():
        expected = as_argv(command)
        for flag in dropped.get(name, ()):
            at = expected.index(flag)
            del expected[at:at + (1 if flag.startswith("--check") or flag.startswith("--enable") else 2)]
        if name == "build-llm":
            expected[expected.index("--max_multimodal_len") + 1] = "3025"
        assert normalize(ours[name]) == normalize(expected), name


def test_budgets_follow_the_largest_image() -> None:
    """Tokens of the largest image within visual.max_image_size: each side capped at the longest edge 1540, up to a
    multiple of 28; a wide box gives fewer rows (its break tokens are text, outside the prompt table)."""
    family = get_family("mistral3")
    spec = spec_from_dict(catalog_entry(MODEL))
    assert family.visual_tokens(spec, ImageSize(height=1540, width=1540)) == 3025
    assert family.visual_tokens(spec, ImageSize(height=4000, width=4000)) == 3025  # scaled down to 1540
    assert family.visual_tokens(spec, ImageSize(height=1080, width=1920)) == 39 * 55  # 1080 fits: 39 rows
    assert family.visual_tokens(spec, ImageSize(height=224, width=224)) == 64
    plan = plan_for({"visual.max_image_size": {"height": 1024, "width": 1024}, "limits.max_batch_size": 2,
                     "visual.max_batch_size": 2})
    build = argvs(plan)["build-llm"]
    assert build[build.index("--max_multimodal_len") + 1] == str(2 * 37 * 37)
    assert argvs(plan)["build-visual"][-2:] == ["--max_batch_size", "2"]
    assert "55 x 55 = 3025 [IMG]" in resolve(spec).family.visual_contract(spec).tokens_source


def test_several_images_per_prompt_are_refused_for_the_release_runner() -> None:
    with pytest.raises(PlanError, match=r"max_images_per_prompt 2: TensorRT-LLM v1\.2\.1's multimodal runner takes one "
                                        r"image per prompt for --model_type pixtral.*--toolchain hf"):
        plan_for({"limits.max_images_per_prompt": 2, "limits.max_input_len": 8192, "limits.max_seq_len": 8392,
                  "visual.max_batch_size": 2})


def test_dialect_09_is_refused_naming_the_release_that_builds_it() -> None:
    with pytest.raises(PlanError, match=(r"mistral3 cannot be planned in dialect 0.9: TensorRT-LLM v0.10.0's "
                                         r"build_visual_engine.py has no --model_type pixtral.*TensorRT-LLM v1.2.1 "
                                         r"builds it.*dialect: '1.2'")):
        plan_for(dialect=Dialect.V0_9)


def test_num_visual_features_is_refused_and_a_short_input_len_named() -> None:
    with pytest.raises(SpecError, match="architecture.num_visual_features does not apply to mistral3"):
        plan_for({"architecture.num_visual_features": 3025})
    with pytest.raises(SpecError) as info:
        plan_for({"limits.max_input_len": 2048, "limits.max_seq_len": 2248})
    assert info.value.path == "limits.max_input_len" and "3025" in str(info.value)


def test_both_toolchains_take_it() -> None:
    from vlmforge.toolchains.hf.stages import check_supported
    from vlmforge.toolchains.trtllm.execute import check_buildable

    resolved = resolve(spec_from_dict(catalog_entry(MODEL)))
    check_supported(resolved)
    check_buildable(resolved.family)
