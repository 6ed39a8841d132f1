"""Golden 1.2 plans of the families TensorRT-LLM 1.2 added (llava_next, llava_onevision, qwen2_vl): every argv exactly,
and the 1.2 multimodal README's commands reproduced, paths aside, with each deliberate deviation named
(/work/notes/families15.md has the README text and where it was read)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.helpers.seed import normalize
from vlmforge.errors import PlanError, SpecError
from vlmforge.families import get_family, resolve
from vlmforge.plans.model import Plan
from vlmforge.specs.catalog import catalog_entry
from vlmforge.specs.schema import Dialect, merge_overrides, spec_from_dict
from vlmforge.toolchains.trtllm.plan import build_plan

MM = "/app/tensorrt_llm/examples/models/core/multimodal"
W = "/workspace"


def plan_for(model: str, overrides: dict[str, Any] | None = None, dialect: Dialect = Dialect.V1_2) -> Plan:
    return build_plan(spec_from_dict(merge_overrides(catalog_entry(model), overrides or {})), dialect=dialect)


def argvs(plan: Plan) -> dict[str, list[str]]:
    return {step.name: step.argv for step in plan.steps}


def readme(command: str) -> list[str]:
    """A README command as argv: ``--flag=value`` split in two (argparse reads both the same)."""
    out: list[str] = []
    for token in command.split():
        out += token.split("=", 1) if token.startswith("--") and "=" in token else [token]
    return out


# --- llava_next (llava-hf/llava-v1.6-mistral-7b-hf) -----------------------------------------------------------------

LLAVA_NEXT = "llava-v1.6-mistral-7b-hf"
LN_HF, LN_CKPT = f"{W}/hf_models/{LLAVA_NEXT}", f"{W}/trt_models/{LLAVA_NEXT}/fp16/1-gpu"
LN_ENGINE = f"{W}/trt_engines/{LLAVA_NEXT}/fp16/1-gpu"

LLAVA_NEXT_GOLDEN = {
    "fetch": ["vlmforge", "fetch", "--", f"hf://llava-hf/{LLAVA_NEXT}", LN_HF],
    "convert": ["python", "../llama/convert_checkpoint.py", "--model_dir", LN_HF, "--output_dir", LN_CKPT,
                "--dtype", "float16"],
    "build-llm": ["trtllm-build", "--checkpoint_dir", LN_CKPT, "--output_dir", f"{LN_ENGINE}/llm",
                  "--gpt_attention_plugin", "float16", "--gemm_plugin", "float16", "--use_fused_mlp", "enable",
                  "--max_batch_size", "1", "--max_input_len", "4096", "--max_seq_len", "5120",
                  "--max_num_tokens", "4096", "--max_multimodal_len", "2928"],
    "build-visual": ["python", "build_multimodal_engine.py", "--model_type", "llava_next", "--model_path", LN_HF,
                     "--output_dir", f"{LN_ENGINE}/vision", "--max_batch_size", "5"],
    "validate": ["python", "run.py", "--max_new_tokens", "30", "--input_text", "\\n Which city is this?",
                 "--hf_model_dir", LN_HF, "--engine_dir", LN_ENGINE],
}

LLAVA_NEXT_README = {
    "convert": "python ../llama/convert_checkpoint.py --model_dir tmp/hf_models/M --output_dir tmp/trt_models/M/fp16/1-gpu "
               "--dtype float16",
    "build-llm": "trtllm-build --checkpoint_dir tmp/trt_models/M/fp16/1-gpu --output_dir tmp/trt_engines/M/fp16/1-gpu/llm "
                 "--gpt_attention_plugin float16 --gemm_plugin float16 --use_fused_mlp=enable --max_batch_size 1 "
                 "--max_input_len 4096 --max_seq_len 5120 --max_num_tokens 4096 --max_multimodal_len 4096",
    "build-visual": "python build_multimodal_engine.py --model_path tmp/hf_models/M --output_dir "
                    "tmp/trt_engines/M/fp16/1-gpu/vision --model_type llava_next --max_batch_size 5",
    "validate": "python run.py --max_new_tokens 30 --hf_model_dir tmp/hf_models/M --engine_dir tmp/trt_engines/M/fp16/1-gpu "
                "--input_text \\n_Which_city_is_this?",
}


def test_llava_next_plan_is_exact() -> None:
    plan = plan_for(LLAVA_NEXT)
    assert [step.name for step in plan.steps] == list(LLAVA_NEXT_GOLDEN)
    assert argvs(plan) == LLAVA_NEXT_GOLDEN
    assert {step.cwd for step in plan.steps} == {MM}
    assert plan.requirements.tensorrt_llm == "v1.2.1" and plan.engine_dir == LN_ENGINE


def test_llava_next_plan_is_the_readme_but_for_the_derived_multimodal_len() -> None:
    """The one deviation: the README's --max_multimodal_len 4096 is max_input_len; vlmforge derives batch x the
    largest image's tokens = 1 x 2928 (576 + 48x48 + 48 at the 672x672 pinpoint), tight and enough."""
    ours = argvs(plan_for(LLAVA_NEXT))
    for name, command in LLAVA_NEXT_README.items():
        expected = [t.replace("_", " ") if t.startswith("\\n") else t for t in readme(command)]
        if name == "build-llm":
            expected[expected.index("--max_multimodal_len") + 1] = "2928"
        assert normalize(ours[name]) == normalize(expected), name


# --- llava_onevision (llava-hf/llava-onevision-qwen2-7b-ov-hf) -------------------------------------------------------

ONEVISION = "llava-onevision-qwen2-7b-ov-hf"
OV_HF, OV_CKPT = f"{W}/hf_models/{ONEVISION}", f"{W}/trt_models/{ONEVISION}/fp16/1-gpu"
OV_ENGINE = f"{W}/trt_engines/{ONEVISION}/fp16/1-gpu"

ONEVISION_GOLDEN = {
    "fetch": ["vlmforge", "fetch", "--", f"hf://llava-hf/{ONEVISION}", OV_HF],
    "convert": ["python", "../qwen/convert_checkpoint.py", "--model_dir", OV_HF, "--output_dir", OV_CKPT,
                "--dtype", "float16"],
    "build-llm": ["trtllm-build", "--checkpoint_dir", OV_CKPT, "--output_dir", f"{OV_ENGINE}/llm",
                  "--gemm_plugin", "float16", "--use_fused_mlp", "enable", "--max_batch_size", "1",
                  "--max_input_len", "8865", "--max_seq_len", "8965", "--max_num_tokens", "8865",
                  "--max_multimodal_len", "8765"],
    "build-visual": ["python", "build_multimodal_engine.py", "--model_type", "llava_onevision", "--model_path", OV_HF,
                     "--output_dir", f"{OV_ENGINE}/vision", "--max_batch_size", "37"],
    "validate": ["python", "run.py", "--max_new_tokens", "30", "--input_text", "What is shown in this image?",
                 "--hf_model_dir", OV_HF, "--engine_dir", OV_ENGINE],
}

ONEVISION_README = {
    "convert": "python ../qwen/convert_checkpoint.py --model_dir tmp/hf_models/M --output_dir tmp/trt_models/M/fp16/1-gpu "
               "--dtype float16",
    "build-llm": "trtllm-build --checkpoint_dir tmp/trt_models/M/fp16/1-gpu --output_dir tmp/trt_engines/M/fp16/1-gpu/llm "
                 "--gemm_plugin float16 --use_fused_mlp=enable --max_batch_size 1 --max_input_len 7228 "
                 "--max_seq_len 7328 --max_multimodal_len 7128",
    "build-visual": "python build_multimodal_engine.py --model_path tmp/hf_models/M --output_dir "
                    "tmp/trt_engines/M/fp16/1-gpu/vision --model_type llava_onevision --max_batch_size 32",
    "validate": "python run.py --max_new_tokens 30 --hf_model_dir tmp/hf_models/M --engine_dir tmp/trt_engines/M/fp16/1-gpu "
                "--input_text What_is_shown_in_this_image?",
}


def test_llava_onevision_plan_is_exact() -> None:
    for model in (ONEVISION, "llava-onevision-qwen2-0.5b-ov-hf"):
        plan = plan_for(model)
        assert {step.cwd for step in plan.steps} == {MM}
        assert plan.requirements.tensorrt_llm == "v1.2.1"
    plan = plan_for(ONEVISION)
    assert [step.name for step in plan.steps] == list(ONEVISION_GOLDEN)
    assert argvs(plan) == ONEVISION_GOLDEN


def test_llava_onevision_plan_is_the_readme_sized_for_its_largest_image() -> None:
    """Deviations, each deliberate: the README's --max_input_len 7228 / --max_multimodal_len 7128 / vision batch 32
    cannot hold one 2048x2048 image (7371 tokens, 37 tiles; the largest image within 2304x2304 gives 8765), so the
    catalog sizes for the largest image with the README's 100 text and 100 output tokens on top; --max_num_tokens =
    max_input_len (the default 8192 is under it). Left out: --image_path image.png (run.py's own image, as every
    plan) and `pip install -r requirements-llava_onevision.txt` (LLaVA-NeXT's repository and av serve the lmms
    checkpoint and video; the container's transformers 4.57.1 meets its >=4.44.2)."""
    ours = argvs(plan_for(ONEVISION))
    sized = {"--max_input_len": "8865", "--max_seq_len": "8965", "--max_multimodal_len": "8765"}
    for name, command in ONEVISION_README.items():
        expected = [t.replace("_", " ") if t.startswith("What_") else t for t in readme(command)]
        for flag, value in sized.items() if name == "build-llm" else ():
            expected[expected.index(flag) + 1] = value
        if name == "build-llm":
            expected += ["--max_num_tokens", "8865"]
        if name == "build-visual":
            expected[expected.index("--max_batch_size") + 1] = "37"
        assert normalize(ours[name]) == normalize(expected), name


def test_llava_onevision_with_the_readmes_limits_is_refused_naming_size_tokens_and_fix() -> None:
    """The README's own limits at its measured 2048x2048 image: refused before any work, saying why and what to do;
    an image box that they hold (768x768: 3699 tokens, 5 tiles) plans."""
    readme_limits = {"limits.max_input_len": 7228, "limits.max_seq_len": 7328, "visual.max_batch_size": 32}
    with pytest.raises(SpecError) as info:
        plan_for(ONEVISION, {**readme_limits, "visual.max_image_size": {"height": 2048, "width": 2048}})
    assert info.value.path == "limits.max_input_len"
    for part in ("2048x2048", "8765 tokens", "98x81 unpadded grid", "raise limits.max_input_len to at least 8765",
                 "lower visual.max_image_size"):
        assert part in str(info.value), part
    with pytest.raises(SpecError, match=r"1 x 1 x 37 = 37.*set visual.max_batch_size: 37") as batch:
        plan_for(ONEVISION, {"visual.max_batch_size": 32})
    assert batch.value.path == "visual.max_batch_size"
    build = argvs(plan_for(ONEVISION, {**readme_limits, "visual.max_image_size": {"height": 768, "width": 768}}))
    assert build["build-llm"][build["build-llm"].index("--max_multimodal_len") + 1] == "3699"
    assert build["build-visual"][-2:] == ["--max_batch_size", "32"]


def test_llava_onevision_refuses_video_and_the_trtllm_plan_several_images() -> None:
    with pytest.raises(SpecError, match="video input to llava_onevision .* is a later step") as info:
        plan_for(ONEVISION, {"validation.input_text": "<video>\nWhat happens?"})
    assert info.value.path == "validation.input_text"
    two = {"limits.max_images_per_prompt": 2, "limits.max_input_len": 18000, "limits.max_seq_len": 18512,
           "visual.max_batch_size": 296}
    with pytest.raises(PlanError, match=r"max_images_per_prompt 2: the trtllm plan of llava_onevision takes one image "
                                        r"per prompt .*--toolchain hf"):
        plan_for(ONEVISION, two)
    # the hf toolchain takes them (one padded tile each): the budgets still count the largest image alone per image
    derived = resolve(spec_from_dict(merge_overrides(catalog_entry(ONEVISION), two))).derived
    assert derived.max_images_per_prompt == 2 and derived.max_multimodal_len == 1 * 2 * 8765  # batch 1


# --- qwen2_vl (Qwen/Qwen2-VL-7B-Instruct) ---------------------------------------------------------------------------

QWEN = "Qwen2-VL-7B-Instruct"
Q_HF, Q_CKPT = f"{W}/hf_models/{QWEN}", f"{W}/trt_models/{QWEN}/fp16/1-gpu"
Q_ENGINE = f"{W}/trt_engines/{QWEN}/fp16/1-gpu"

QWEN_GOLDEN = {
    "fetch": ["vlmforge", "fetch", "--", f"hf://Qwen/{QWEN}", Q_HF],
    "install-requirements": ["pip", "install", "-r", "requirements-qwen2vl.txt"],
    "convert": ["python", "../qwen/convert_checkpoint.py", "--model_dir", Q_HF, "--output_dir", Q_CKPT,
                "--dtype", "float16"],
    "build-llm": ["trtllm-build", "--checkpoint_dir", Q_CKPT, "--output_dir", f"{Q_ENGINE}/llm",
                  "--gpt_attention_plugin", "float16", "--gemm_plugin", "float16", "--max_batch_size", "4",
                  "--max_input_len", "2048", "--max_seq_len", "3072", "--max_num_tokens", "2048",
                  "--max_multimodal_len", "1296"],
    "build-visual": ["python", "build_multimodal_engine.py", "--model_type", "qwen2_vl", "--model_path", Q_HF,
                     "--output_dir", f"{Q_ENGINE}/vision", "--min_hw_dims", "16", "--max_hw_dims", "1296"],
    "validate": ["python", "run.py", "--hf_model_dir", Q_HF, "--engine_dir", Q_ENGINE],
}

QWEN_README = {
    "install-requirements": "pip install -r requirements-qwen2vl.txt",
    "convert": "python3 ../qwen/convert_checkpoint.py --model_dir=tmp/hf_models/M --output_dir=tmp/trt_models/M/fp16/1-gpu "
               "--dtype float16",
    "build-llm": "trtllm-build --checkpoint_dir tmp/trt_models/M/fp16/1-gpu --output_dir tmp/trt_engines/M/fp16/1-gpu/llm "
                 "--gemm_plugin=float16 --gpt_attention_plugin=float16 --max_batch_size=4 --max_input_len=2048 "
                 "--max_seq_len=3072 --max_multimodal_len=1296",
    "build-visual": "python build_multimodal_engine.py --model_type qwen2_vl --model_path tmp/hf_models/M "
                    "--output_dir tmp/trt_engines/M/fp16/1-gpu/vision",
    "validate": "python3 run.py --hf_model_dir tmp/hf_models/M --engine_dir tmp/trt_engines/M/fp16/1-gpu/",
}


def test_qwen2_vl_plan_is_exact() -> None:
    plan = plan_for(QWEN)
    assert [step.name for step in plan.steps] == list(QWEN_GOLDEN)
    assert argvs(plan) == QWEN_GOLDEN
    assert {step.cwd for step in plan.steps} == {MM}


def test_qwen2_vl_plan_is_the_readme_with_its_named_additions() -> None:
    """Deviations, each deliberate: `python` for `python3`; --max_num_tokens = max_input_len (NVIDIA's CI for
    qwen2_vl); --min_hw_dims 16 (the smallest image's patch rows; the builder's 128 refuses a 112x112 image) and
    --max_hw_dims 1296 (the 504x504 image's rows; the builder's 5184 sizes a 20736x20736 attention mask)."""
    ours = argvs(plan_for(QWEN))
    additions = {"build-llm": ["--max_num_tokens", "2048"],
                 "build-visual": ["--min_hw_dims", "16", "--max_hw_dims", "1296"]}
    for name, command in QWEN_README.items():
        expected = ["python" if t == "python3" else t for t in readme(command)] + additions.get(name, [])
        assert normalize(ours[name]) == normalize(expected), name


def test_qwen2_vl_fp8_plan_follows_the_readme() -> None:
    """FP8: quantize.py (--qformat fp8 --kv_cache_dtype fp8), then the build with --gemm_plugin auto and no
    --gpt_attention_plugin, as the README writes it."""
    plan = plan_for(QWEN, {"quantization.method": "fp8", "quantization.kv_cache_dtype": "fp8",
                           "quantization.calibration.size": 512})
    steps = argvs(plan)
    assert "convert" not in steps
    ckpt = f"{W}/trt_models/{QWEN}/fp8_kvfp8/1-gpu"
    assert steps["quantize"] == ["python", "../../../quantization/quantize.py", "--model_dir", Q_HF, "--output_dir", ckpt,
                                 "--dtype", "float16", "--qformat", "fp8", "--calib_size", "512",
                                 "--kv_cache_dtype", "fp8"]
    build = steps["build-llm"]
    assert "--gpt_attention_plugin" not in build and build[build.index("--gemm_plugin") + 1] == "auto"
    assert plan.requirements.min_compute_capability == "8.9"


def test_weight_only_and_tp_use_the_release_converter_flags() -> None:
    steps = argvs(plan_for(QWEN, {"quantization.method": "int8_wo", "parallel.tp": 2}))
    assert steps["convert"][-5:] == ["--tp_size", "2", "--use_weight_only", "--weight_only_precision", "int8"]
    assert steps["validate"][:4] == ["mpirun", "-n", "2", "--allow-run-as-root"]
    assert "--use_fused_mlp" not in argvs(plan_for(LLAVA_NEXT, {"quantization.method": "int4_wo"}))["build-llm"]


def test_larger_images_and_batches_resize_every_budget() -> None:
    """1008x1008 images, batch 2, two images per prompt: 1296 tokens and 5184 rows per image."""
    plan = plan_for(QWEN, {"visual.max_image_size": {"height": 1008, "width": 1008}, "limits.max_batch_size": 2,
                           "limits.max_images_per_prompt": 2, "limits.max_input_len": 4096, "limits.max_seq_len": 5120})
    steps = argvs(plan)
    build = steps["build-llm"]
    assert build[build.index("--max_multimodal_len") + 1] == str(2 * 2 * 1296)
    visual = steps["build-visual"]
    assert visual[visual.index("--max_hw_dims") + 1] == "5184"
    assert plan.derived.visual_max_batch_size == 4


# --- refusals ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model", [LLAVA_NEXT, ONEVISION, QWEN])
def test_dialect_09_is_refused_naming_the_family_and_the_release(model: str) -> None:
    family = get_family(catalog_entry(model)["family"]).name
    with pytest.raises(PlanError, match=(f"{family} cannot be planned in dialect 0.9: TensorRT-LLM v0.10.0's "
                                         f"build_visual_engine.py has no --model_type {family}.*TensorRT-LLM v1.2.1 "
                                         "builds it.*dialect: '1.2'")):
        plan_for(model, dialect=Dialect.V0_9)


def test_qwen2_vl_sized_below_the_runners_image_is_refused() -> None:
    """1.2's run.py resizes every image to 504x504 (324 tokens): an engine sized for 224x224 (64 tokens, 256 rows)
    would refuse the validate step's own image."""
    with pytest.raises(PlanError, match=r"224x224 gives at most 64 tokens.*resizes every image to 504x504.*"
                                        r"set visual.max_image_size to 504x504 or more"):
        plan_for(QWEN, {"visual.max_image_size": {"height": 224, "width": 224}})
    assert plan_for(QWEN, {"visual.max_image_size": {"height": 480, "width": 560}}).steps  # 17 x 20 = 340 tokens


def test_vicuna_is_refused_for_the_runner_it_cannot_use() -> None:
    with pytest.raises(PlanError, match="has llava_next prompt templates only for mistralai/Mistral-7B-Instruct-v0.2"):
        plan_for("llava-v1.6-vicuna-7b-hf")


@pytest.mark.parametrize("model", [LLAVA_NEXT, QWEN, ONEVISION])
def test_later_families_pass_both_toolchains_checks(model: str) -> None:
    """The hf toolchain builds llava_next, qwen2_vl and llava_onevision now (tests/families/test_llava_next_hf.py,
    test_qwen2_vl_hf.py, test_llava_onevision_hf.py): neither check refuses them."""
    from vlmforge.toolchains.hf.stages import check_supported
    from vlmforge.toolchains.trtllm.execute import check_buildable

    resolved = resolve(spec_from_dict(catalog_entry(model)))
    check_supported(resolved)
    check_buildable(resolved.family)
