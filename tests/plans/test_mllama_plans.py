"""Golden 1.2 plans of mllama (Llama-3.2-11B-Vision and -Instruct): every argv exactly, and the 1.2 multimodal README's
MLLaMA section reproduced, paths aside, with each deliberate deviation named. README read at NVIDIA/TensorRT-LLM
89fd9b74 (examples/models/core/multimodal/README.md, "## MLLaMA"), as tests/contract/README.md records for 1.2."""

from __future__ import annotations

import pytest

from tests.helpers.seed import normalize
from tests.plans.test_later_family_plans import MM, W, argvs, plan_for, readme
from vlmforge.errors import PlanError, SpecError
from vlmforge.families import get_family
from vlmforge.families.mllama import RUNNER_IMAGE_URL
from vlmforge.specs.catalog import catalog_entry
from vlmforge.specs.schema import Dialect, merge_overrides, spec_from_dict
from vlmforge.specs.visual import VisualPlacement

BASE, INSTRUCT = "Llama-3.2-11B-Vision", "Llama-3.2-11B-Vision-Instruct"
HAIKU = "<|image|><|begin_of_text|>If I had to write a haiku for this one"


def golden(model: str, encoder_len: str) -> dict[str, list[str]]:
    hf, ckpt, engine = f"{W}/hf_models/{model}", f"{W}/trt_models/{model}/bfloat16/1-gpu", \
        f"{W}/trt_engines/{model}/bfloat16/1-gpu"
    return {
        "fetch": ["vlmforge", "fetch", "--", f"hf://meta-llama/{model}", hf],
        "convert": ["python", "../mllama/convert_checkpoint.py", "--model_dir", hf, "--output_dir", ckpt,
                    "--dtype", "bfloat16"],
        "build-llm": ["trtllm-build", "--checkpoint_dir", ckpt, "--output_dir", f"{engine}/llm",
                      "--gemm_plugin", "auto", "--max_batch_size", "4", "--max_input_len", "1024", "--max_seq_len", "2048",
                      "--max_num_tokens", "4096", "--max_encoder_input_len", encoder_len],
        "build-visual": ["python", "build_multimodal_engine.py", "--model_type", "mllama", "--model_path", hf,
                         "--output_dir", f"{engine}/vision"],
        "validate": ["python", "run.py", "--max_new_tokens", "50", "--input_text", HAIKU, "--hf_model_dir", hf,
                     "--engine_dir", engine, "--image_path", RUNNER_IMAGE_URL],
    }


README = {  # the README's commands, run from the repository root (vlmforge runs every step in the multimodal dir)
    "convert": "python examples/models/core/mllama/convert_checkpoint.py --model_dir Llama-3.2-11B-Vision/ "
               "--output_dir /tmp/mllama/trt_ckpts --dtype bfloat16",
    "build-llm": "trtllm-build --checkpoint_dir /tmp/mllama/trt_ckpts --output_dir /tmp/mllama/trt_engines/llm/ "
                 "--max_num_tokens 4096 --max_seq_len 2048 --workers 1 --gemm_plugin auto --max_batch_size 4 "
                 "--max_encoder_input_len 4100 --input_timing_cache model.cache",
    "build-visual": "python examples/models/core/multimodal/build_multimodal_engine.py --model_type mllama "
                    "--model_path Llama-3.2-11B-Vision/ --output_dir /tmp/mllama/trt_engines/vision/",
    "validate": f"python3 examples/models/core/multimodal/run.py --engine_dir /tmp/mllama/trt_engines/ "
                f"--hf_model_dir Llama-3.2-11B-Vision/ --image_path {RUNNER_IMAGE_URL} --input_text HAIKU "
                "--max_new_tokens 50 --batch_size 2",
}
SCRIPTS = {"examples/models/core/mllama/convert_checkpoint.py": "../mllama/convert_checkpoint.py",
           "examples/models/core/multimodal/build_multimodal_engine.py": "build_multimodal_engine.py",
           "examples/models/core/multimodal/run.py": "run.py"}


@pytest.mark.parametrize(("model", "encoder_len"), [(BASE, "4100"), (INSTRUCT, "6404")])
def test_mllama_plan_is_exact(model: str, encoder_len: str) -> None:
    plan = plan_for(model)
    assert argvs(plan) == golden(model, encoder_len)
    assert [step.name for step in plan.steps] == list(golden(model, encoder_len))
    assert {step.cwd for step in plan.steps} == {MM} and plan.requirements.tensorrt_llm == "v1.2.1"


@pytest.mark.parametrize(("model", "encoder_len"), [(BASE, "4100"), (INSTRUCT, "6404")])
def test_mllama_plan_is_the_readme_with_its_named_deviations(model: str, encoder_len: str) -> None:
    """Deviations, each deliberate: scripts written relative to the multimodal directory (the README runs from the
    repository root) and `python` for `python3`; --max_input_len 1024 written out (trtllm-build's default, which the
    README leaves implicit and its --max_num_tokens 4096 = 4 x 1024 assumes); no --workers 1 (the default) and no
    --input_timing_cache model.cache (a cache file outside the plan's workspace); run.py without --batch_size 2 (the
    README repeats its one prompt twice; validation runs it once, as for every family). The Instruct model: the README's
    note, --max_encoder_input_len 6404."""
    ours = argvs(plan_for(model))
    dropped = {"--workers", "--input_timing_cache", "--batch_size"}
    for name, command in README.items():
        words = [SCRIPTS.get(t, "python" if t == "python3" else t) for t in readme(command)]
        words = [HAIKU if t == "HAIKU" else t for t in words]
        expected: list[str] = []
        index = 0
        while index < len(words):
            if words[index] in dropped:
                index += 2
                continue
            expected.append(words[index])
            index += 1
        if name == "build-llm":
            expected[expected.index("--max_encoder_input_len") + 1] = encoder_len
            expected += ["--max_input_len", "1024"]
        assert normalize(ours[name]) == normalize(expected), name


def test_the_budget_is_explained_and_holds_the_largest_image() -> None:
    plan = plan_for(INSTRUCT)
    derived = plan.derived
    assert derived.max_encoder_input_len == 6404 and derived.num_visual_features == 6404
    explained = {line.name: line for line in derived.explanation}
    assert explained["visual_placement"].value == VisualPlacement.CROSS_ATTENTION.value
    formula = explained["num_visual_features"].formula
    for part in ("max_num_tiles x ((image_size / patch)^2 + 1 class token)", "4 x (40^2 + 1) = 4 x 1601",
                 "pads each tile to a multiple of 8"):
        assert part in formula, part
    assert explained["max_encoder_input_len"].formula.startswith("max_images_per_prompt x num_visual_features")
    assert explained["max_num_tokens"].value == 4096
    base = {line.name: line for line in plan_for(BASE).derived.explanation}
    assert "4 x (32^2 + 1) = 4 x 1025" in base["num_visual_features"].formula
    # the text alone counts against max_input_len: the states are not prompt positions
    assert plan_for(INSTRUCT, {"limits.max_input_len": 64, "limits.max_seq_len": 128}).derived.max_input_len == 64


def test_limits_that_cannot_hold_the_largest_image_are_refused() -> None:
    with pytest.raises(SpecError, match=r"max_encoder_input_len \(4100\) cannot hold the cross-attention states.*"
                                        r"= 6404") as info:
        plan_for(INSTRUCT, {"limits.max_encoder_input_len": 4100})
    assert info.value.path == "limits.max_encoder_input_len"
    assert plan_for(INSTRUCT, {"limits.max_encoder_input_len": 6404}).derived.max_encoder_input_len == 6404
    with pytest.raises(PlanError, match=r"max_images_per_prompt 2: TensorRT-LLM v1\.2\.1's mllama visual engine "
                                        r"takes \[B, 1, 4, 3, S, S\] \(the export fixes the media axis at 1.*"
                                        r"--toolchain hf"):
        plan_for(INSTRUCT, {"limits.max_images_per_prompt": 2, "visual.max_batch_size": 8})
    with pytest.raises(SpecError, match="num_visual_features does not apply to mllama.*4 x 1601 = 6404"):
        plan_for(INSTRUCT, {"architecture.num_visual_features": 4100})
    with pytest.raises(SpecError, match="visual.max_image_size"):
        plan_for(INSTRUCT, {"visual.max_image_size": {"height": 1120, "width": 1120}})
    with pytest.raises(SpecError, match="visual.max_batch_size: 8"):
        plan_for(INSTRUCT, {"limits.max_batch_size": 8})


def test_a_decoder_only_prompt_family_still_refuses_max_encoder_input_len() -> None:
    with pytest.raises(SpecError, match="applies to encoder-decoder and cross-attention families only"):
        plan_for("llava-v1.6-mistral-7b-hf", {"limits.max_encoder_input_len": 100})


def test_dialect_0_9_is_refused_with_the_reason() -> None:
    with pytest.raises(PlanError, match=r"v0.10.0 \(the seed's release, June 2024\) predates Llama-3.2-Vision.*"
                                        r"no --model_type mllama.*set dialect: '1.2'"):
        plan_for(BASE, dialect=Dialect.V0_9)


def test_fp8_and_weight_only_follow_the_readme_others_are_refused() -> None:
    steps = argvs(plan_for(BASE, {"quantization.method": "fp8", "quantization.kv_cache_dtype": "fp8",
                                  "quantization.calibration.size": 512}))
    assert steps["quantize"][steps["quantize"].index("--qformat"):] == [
        "--qformat", "fp8", "--calib_size", "512", "--kv_cache_dtype", "fp8"]
    assert steps["build-llm"][-4:] == ["--use_paged_context_fmha", "enable", "--use_fp8_context_fmha", "enable"]
    convert = argvs(plan_for(BASE, {"quantization.method": "int4_wo"}))["convert"]
    assert convert[-3:] == ["--use_weight_only", "--weight_only_precision", "int4"]
    for overrides, path in (({"quantization.method": "int4_awq"}, "quantization.method"),
                            ({"quantization.method": "int8_sq"}, "quantization.method"),
                            ({"quantization.kv_cache_dtype": "int8"}, "quantization.kv_cache_dtype"),
                            ({"quantization.kv_cache_dtype": "fp8"}, "quantization.kv_cache_dtype")):
        with pytest.raises(SpecError, match="mllama") as info:
            plan_for(BASE, overrides)
        assert info.value.path == path


def test_the_90b_models_split_the_llm_and_count_560_pixel_tiles() -> None:
    for model in ("Llama-3.2-90B-Vision", "Llama-3.2-90B-Vision-Instruct"):
        plan = plan_for(model)
        steps = argvs(plan)
        assert steps["convert"][-2:] == ["--tp_size", "4"] and plan.derived.max_encoder_input_len == 6404
        assert steps["validate"][:4] == ["mpirun", "-n", "4", "--allow-run-as-root"]


def test_the_tiny_model_counts_its_own_geometry() -> None:
    """tiny://mllama: 28-pixel tiles, 4 x (2^2 + 1) = 20 states per image (its visual engine's rows per image)."""
    plan = plan_for("tiny-mllama")
    assert plan.derived.max_encoder_input_len == 20 and get_family("mllama").hf_supported
    spec = spec_from_dict(merge_overrides(catalog_entry("tiny-mllama"), {}))
    assert "4 x (2^2 + 1) = 4 x 5" in get_family("mllama").visual_contract(spec).tokens_source


def test_checkpoint_config_must_tile_as_counted() -> None:
    family = get_family("mllama")
    spec = spec_from_dict(catalog_entry(BASE))
    family.check_checkpoint_config(spec, {"vision_config": {"image_size": 448, "patch_size": 14, "max_num_tiles": 4}})
    with pytest.raises(SpecError, match=r"4100\)") as info:
        family.check_checkpoint_config(spec, {"vision_config": {"image_size": 560, "patch_size": 14,
                                                                "max_num_tiles": 4}})
    assert info.value.path == "source"
