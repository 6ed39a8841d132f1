"""Golden 1.2 plans of Fuyu (adept/fuyu-8b) and Kosmos-2: every argv exactly, and the 1.2 multimodal README's commands
(NVIDIA/TensorRT-LLM examples/models/core/multimodal/README.md, index commit 89fd9b74) reproduced, paths aside, with
each deliberate deviation named; the seed's dialect refused; the budgets' refusals."""

from __future__ import annotations

import pytest

from tests.helpers.seed import normalize
from tests.plans.test_later_family_plans import MM, W, argvs, plan_for, readme
from vlmforge.errors import PlanError, SpecError
from vlmforge.families import get_family, resolve
from vlmforge.families.fuyu import TARGET, image_grid, largest_grid
from vlmforge.specs.catalog import catalog_entry
from vlmforge.specs.schema import Dialect, ImageSize, merge_overrides, spec_from_dict

FUYU = "fuyu-8b"
FU_HF, FU_CKPT = f"{W}/hf_models/{FUYU}", f"{W}/trt_models/{FUYU}/fp16/1-gpu"
FU_ENGINE = f"{W}/trt_engines/{FUYU}/fp16/1-gpu"

FUYU_GOLDEN = {
    "fetch": ["vlmforge", "fetch", "--", "hf://adept/fuyu-8b", FU_HF],
    "convert": ["python", "../gpt/convert_checkpoint.py", "--model_dir", FU_HF, "--output_dir", FU_CKPT,
                "--dtype", "float16", "--gpt_variant", "persimmon"],
    "build-llm": ["trtllm-build", "--checkpoint_dir", FU_CKPT, "--output_dir", f"{FU_ENGINE}/llm",
                  "--gemm_plugin", "float16", "--use_fused_mlp", "enable", "--max_batch_size", "1",
                  "--max_input_len", "2440", "--max_seq_len", "2952", "--max_multimodal_len", "2304"],
    "build-visual": ["python", "build_multimodal_engine.py", "--model_type", "fuyu", "--model_path", FU_HF,
                     "--output_dir", f"{FU_ENGINE}/vision"],
    "validate": ["python", "run.py", "--hf_model_dir", FU_HF, "--engine_dir", FU_ENGINE],
}

FUYU_README = {
    "convert": "python ../gpt/convert_checkpoint.py --model_dir tmp/hf_models/M --output_dir tmp/trt_models/M/fp16/1-gpu "
               "--dtype float16 --gpt_variant persimmon",
    "build-llm": "trtllm-build --checkpoint_dir tmp/trt_models/M/fp16/1-gpu --output_dir tmp/trt_engines/M/fp16/1-gpu/llm "
                 "--gemm_plugin float16 --use_fused_mlp=enable --max_batch_size 1 --max_input_len 2048 "
                 "--max_seq_len 2560 --max_multimodal_len 2048",
    "build-visual": "python build_multimodal_engine.py --model_type fuyu --model_path tmp/hf_models/M "
                    "--output_dir tmp/trt_engines/M/fp16/1-gpu/vision",
    "validate": "python run.py --hf_model_dir tmp/hf_models/M --engine_dir tmp/trt_engines/M/fp16/1-gpu",
}


def test_fuyu_plan_is_exact() -> None:
    plan = plan_for(FUYU)
    assert [step.name for step in plan.steps] == list(FUYU_GOLDEN)
    assert argvs(plan) == FUYU_GOLDEN
    assert {step.cwd for step in plan.steps} == {MM}
    assert plan.requirements.tensorrt_llm == "v1.2.1" and plan.engine_dir == FU_ENGINE


def test_fuyu_plan_is_the_readme_sized_for_its_largest_image() -> None:
    """Deviations, each deliberate: the README's --max_input_len 2048 / --max_multimodal_len 2048 cannot hold one
    1080x1920 image (36 x 64 = 2304 patches in the prompt table, + 36 newline tokens = 2340 prompt positions), so the
    catalog sizes for it: 2340 + 100 text tokens, the README's 512 output tokens on top; the table is 1 x 2304."""
    ours = argvs(plan_for(FUYU))
    sized = {"--max_input_len": "2440", "--max_seq_len": "2952", "--max_multimodal_len": "2304"}
    for name, command in FUYU_README.items():
        expected = readme(command)
        for flag, value in sized.items() if name == "build-llm" else ():
            expected[expected.index(flag) + 1] = value
        assert normalize(ours[name]) == normalize(expected), name


def test_fuyu_counts_match_the_processor_arithmetic() -> None:
    """ceil(h/30) x ceil(w/30) at the fitted size: the notes' measured counts (224^2 -> 64 + 8, 504^2 -> 289 + 17,
    1024x768 -> 910 + 26 (h x w = 768 x 1024 there), 1920x1080 -> 2304 + 36, 2048^2 -> 1296 + 36)."""
    assert [(g.patches, g.rows) for g in (image_grid(224, 224), image_grid(504, 504), image_grid(768, 1024),
                                          image_grid(1080, 1920), image_grid(2048, 2048))] == [
        (64, 8), (289, 17), (910, 26), (2304, 36), (1296, 36)]
    # the largest within a box is at min(box, target): a box past the target gives the target's grid
    assert largest_grid(ImageSize(height=4000, width=4000)) == image_grid(1080, 1920)
    for box in (ImageSize(height=300, width=500), ImageSize(height=2000, width=700)):
        brute = max((image_grid(h, w) for h in range(30, box.height + 1, 29) for w in range(30, box.width + 1, 29)),
                    key=lambda g: g.patches)
        assert largest_grid(box).patches >= brute.patches


def test_fuyu_budgets_are_explained_and_refused_when_they_cannot_hold_the_image() -> None:
    resolved = resolve(spec_from_dict(catalog_entry(FUYU)))
    explained = {e.name: e for e in resolved.derived.explanation}
    assert explained["num_visual_features"].value == 2304
    assert explained["prompt_positions_per_image"].value == 2340
    # room for the patches but not their newlines: refused by the family's own rule
    tight = merge_overrides(catalog_entry(FUYU), {"limits.max_input_len": 2320, "limits.max_seq_len": 2832})
    with pytest.raises(SpecError, match=r"2304 patches \+ 36 newline tokens = 2340") as error:
        resolve(spec_from_dict(tight))
    assert error.value.path == "limits.max_input_len"
    entry = merge_overrides(catalog_entry(FUYU), {"limits.max_input_len": 2048, "limits.max_seq_len": 2560})
    with pytest.raises(SpecError, match="cannot hold"):
        resolve(spec_from_dict(entry))
    # the README's limits hold an image of up to 1080x1620 (36 x 54 = 1944 + 36 = 1980)
    smaller = merge_overrides(entry, {"visual.max_image_size": {"height": 1080, "width": 1620}})
    assert resolve(spec_from_dict(smaller)).derived.max_multimodal_len == 1944
    assert get_family("fuyu").default_max_image_size == TARGET


@pytest.mark.parametrize("overrides, match", [
    ({}, "seed README"),
])
def test_fuyu_is_refused_in_the_seed_dialect(overrides: dict, match: str) -> None:
    with pytest.raises(PlanError, match=match):
        plan_for(FUYU, overrides, dialect=Dialect.V0_9)


def test_fuyu_calibrated_quantization_is_refused_and_weight_only_converts() -> None:
    with pytest.raises(PlanError, match="int4_awq"):
        plan_for(FUYU, {"quantization.method": "int4_awq"})
    convert = argvs(plan_for(FUYU, {"quantization.method": "int8_wo"}))["convert"]
    assert convert[-5:] == ["--use_weight_only", "--weight_only_precision", "int8", "--gpt_variant", "persimmon"]


# --- kosmos-2 (microsoft/kosmos-2-patch14-224) --------------------------------------------------------------------

KOSMOS = "kosmos-2-patch14-224"
KO_HF, KO_CKPT = f"{W}/hf_models/{KOSMOS}", f"{W}/trt_models/{KOSMOS}/fp16/1-gpu"
KO_ENGINE = f"{W}/trt_engines/{KOSMOS}/fp16/1-gpu"

KOSMOS_GOLDEN = {
    "fetch": ["vlmforge", "fetch", "--", "hf://microsoft/kosmos-2-patch14-224", KO_HF],
    "convert": ["python", "../gpt/convert_checkpoint.py", "--model_dir", KO_HF, "--output_dir", KO_CKPT,
                "--dtype", "float16", "--gpt_variant", "kosmos-2"],
    "build-llm": ["trtllm-build", "--checkpoint_dir", KO_CKPT, "--output_dir", f"{KO_ENGINE}/llm",
                  "--gpt_attention_plugin", "float16", "--gemm_plugin", "float16", "--max_batch_size", "1",
                  "--max_input_len", "512", "--max_seq_len", "1024", "--max_multimodal_len", "64"],
    "build-visual": ["python", "build_multimodal_engine.py", "--model_type", "kosmos-2", "--model_path", KO_HF,
                     "--output_dir", f"{KO_ENGINE}/vision"],
    "validate": ["python", "run.py", "--hf_model_dir", KO_HF, "--engine_dir", KO_ENGINE],
}

KOSMOS_README = {
    "convert": "python ../gpt/convert_checkpoint.py --model_dir tmp/hf_models/kosmos-2 --output_dir "
               "tmp/trt_models/kosmos-2/fp16/1-gpu --dtype float16 --gpt_variant kosmos-2",
    "build-llm": "trtllm-build --checkpoint_dir tmp/trt_models/kosmos-2/fp16/1-gpu --output_dir "
                 "tmp/trt_engines/kosmos-2/fp16/1-gpu/llm --gpt_attention_plugin float16 --gemm_plugin float16 "
                 "--max_batch_size 1 --max_input_len 512 --max_seq_len 1024 --max_multimodal_len 64",
    "build-visual": "python build_multimodal_engine.py --model_type kosmos-2 --model_path tmp/hf_models/kosmos-2 "
                    "--output_dir tmp/trt_engines/kosmos-2/fp16/1-gpu/vision",
    "validate": "python run.py --hf_model_dir tmp/hf_models/kosmos-2 --engine_dir tmp/trt_engines/kosmos-2/fp16/1-gpu",
}
"""The README's commands with MODEL_NAME=kosmos-2 (its hf folder is named kosmos-2, ours after the catalog entry)."""


def test_kosmos_plan_is_exact() -> None:
    plan = plan_for(KOSMOS)
    assert [step.name for step in plan.steps] == list(KOSMOS_GOLDEN)
    assert argvs(plan) == KOSMOS_GOLDEN
    assert {step.cwd for step in plan.steps} == {MM}
    assert plan.requirements.tensorrt_llm == "v1.2.1" and plan.engine_dir == KO_ENGINE


def test_kosmos_plan_is_the_readme() -> None:
    """No deviation but the paths: 64 rows per image (latent_query_num), 1 x 64 = the README's table."""
    ours = argvs(plan_for(KOSMOS))
    for name, command in KOSMOS_README.items():
        assert normalize(ours[name]) == normalize(readme(command)), name


def test_kosmos_budgets_scale_with_the_batch_and_are_refused_when_too_small() -> None:
    derived = resolve(spec_from_dict(merge_overrides(catalog_entry(KOSMOS), {
        "limits.max_batch_size": 4, "visual.max_batch_size": 4}))).derived
    assert derived.max_multimodal_len == 4 * 64 and derived.num_visual_features == 64
    with pytest.raises(SpecError, match="max_input_len"):
        resolve(spec_from_dict(merge_overrides(catalog_entry(KOSMOS), {"limits.max_input_len": 60,
                                                                       "limits.max_seq_len": 600})))
    with pytest.raises(SpecError, match="visual.max_image_size"):
        resolve(spec_from_dict(merge_overrides(catalog_entry(KOSMOS), {
            "visual.max_image_size": {"height": 448, "width": 448}})))


def test_kosmos_is_refused_in_the_seed_dialect_and_with_calibration() -> None:
    with pytest.raises(PlanError, match="seed README.*Kosmos-2 section"):
        plan_for(KOSMOS, dialect=Dialect.V0_9)
    with pytest.raises(PlanError, match="int8_sq"):
        plan_for(KOSMOS, {"quantization.method": "int8_sq"})
