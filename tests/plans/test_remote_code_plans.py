"""Golden 1.2 plans of the remote-code families (plan-only: internvl, phi3_vision, cogvlm, internlm_xcomposer2, neva): every argv exactly, and
the 1.2 multimodal README's commands reproduced, paths aside, with each deliberate deviation named. README text read
from NVIDIA/TensorRT-LLM examples/models/core/multimodal/README.md at index commit 000a01de (1.2-era, as
tests/plans/test_later_family_plans.py's)."""

from __future__ import annotations

import pytest

from tests.helpers.seed import normalize
from tests.plans.test_later_family_plans import MM, W, argvs, plan_for, readme
from vlmforge.errors import PlanError, SpecError, ToolchainUnavailable
from vlmforge.families import get_family, resolve
from vlmforge.specs.catalog import catalog_entry
from vlmforge.specs.schema import Dialect, spec_from_dict

# --- internvl (OpenGVLab/InternVL2-*) --------------------------------------------------------------------------------

IV = "InternVL2-4B"
IV_HF, IV_CKPT, IV_ENGINE = f"{W}/hf_models/{IV}", f"{W}/trt_models/{IV}/fp16/1-gpu", f"{W}/trt_engines/{IV}/fp16/1-gpu"

INTERNVL_GOLDEN = {
    "fetch": ["vlmforge", "fetch", "--", f"hf://OpenGVLab/{IV}", IV_HF],
    "install-requirements": ["pip", "install", "transformers==4.37.2"],
    "convert": ["python", "../phi/convert_checkpoint.py", "--model_dir", IV_HF, "--output_dir", IV_CKPT,
                "--dtype", "float16"],
    "build-llm": ["trtllm-build", "--checkpoint_dir", IV_CKPT, "--output_dir", f"{IV_ENGINE}/llm",
                  "--gemm_plugin", "auto", "--max_batch_size", "1", "--max_input_len", "4096",
                  "--max_seq_len", "4608", "--max_multimodal_len", "3328"],
    "build-visual": ["python", "build_multimodal_engine.py", "--model_type", "internvl", "--model_path", IV_HF,
                     "--output_dir", f"{IV_ENGINE}/vision"],
    "validate": ["python", "run.py", "--hf_model_dir", IV_HF, "--engine_dir", IV_ENGINE,
                 "--image_path", f"{IV_HF}/examples/image1.jpg"],
}

INTERNVL_README = {
    "install-requirements": "pip install transformers==4.37.2",
    "convert": "python ../${LLM_MODEL_NAME}/convert_checkpoint.py --model_dir tmp/hf_models/M "
               "--output_dir tmp/trt_models/M/fp16/1-gpu --dtype float16",
    "build-llm": "trtllm-build --checkpoint_dir tmp/trt_models/M/fp16/1-gpu --output_dir tmp/trt_engines/M/fp16/1-gpu/llm "
                 "--gemm_plugin auto --max_batch_size 1 --max_input_len 4096 --max_seq_len 4608 --max_multimodal_len 3328",
    "build-visual": "python build_multimodal_engine.py --model_type internvl --model_path tmp/hf_models/M "
                    "--output_dir tmp/trt_engines/M/fp16/1-gpu/vision",
    "validate": "python run.py --hf_model_dir tmp/hf_models/M --engine_dir tmp/trt_engines/M/fp16/1-gpu/ "
                "--image_path tmp/hf_models/M/examples/image1.jpg",
}


def test_internvl_plan_is_exact() -> None:
    plan = plan_for(IV)
    assert [step.name for step in plan.steps] == list(INTERNVL_GOLDEN)
    assert argvs(plan) == INTERNVL_GOLDEN
    assert {step.cwd for step in plan.steps} == {MM}
    assert plan.requirements.tensorrt_llm == "v1.2.1" and plan.engine_dir == IV_ENGINE


@pytest.mark.parametrize(("model", "llm"), [("InternVL2-1B", "qwen"), ("InternVL2-2B", "internlm2"),
                                            ("InternVL2-4B", "phi"), ("InternVL2-8B", "internlm2"),
                                            ("InternVL2-26B", "internlm2")])
def test_internvl_plan_is_the_readme_with_its_llm_converter(model: str, llm: str) -> None:
    """No deviation: the README's LLM_MODEL_NAME per size (1B qwen, 2B/8B/26B internlm2, 4B phi); its
    --max_multimodal_len 3328 is vlmforge's 1 x 13 tiles x 256 tokens."""
    ours = argvs(plan_for(model))
    for name, command in INTERNVL_README.items():
        command = command.replace("tmp/hf_models/M/examples", f"{W}/hf_models/{model}/examples")  # a path value
        expected = readme(command.replace("${LLM_MODEL_NAME}", llm))
        assert normalize(ours[name]) == normalize(expected), name
    assert ours["convert"][1] == f"../{llm}/convert_checkpoint.py"


def test_internvl_budgets_follow_batch_and_say_how() -> None:
    plan = plan_for(IV, {"limits.max_batch_size": 2, "limits.max_input_len": 8192, "limits.max_seq_len": 8704})
    build = argvs(plan)["build-llm"]
    assert build[build.index("--max_multimodal_len") + 1] == str(2 * 3328)
    assert "--max_batch_size" not in argvs(plan)["build-visual"]  # the builder's 4 images x 12 tiles hold 2
    explained = {line.name: line for line in plan.derived.explanation}
    assert "13 tiles x (448/14)^2 x 0.5^2 = 256 tokens" in explained["num_visual_features"].formula
    assert "the most one image gives" in explained["num_visual_features"].formula
    with pytest.raises(SpecError, match="cannot hold the visual tokens|smaller than one image's visual features"):
        plan_for(IV, {"limits.max_input_len": 2048, "limits.max_seq_len": 2560})


def test_internvl_of_an_unknown_checkpoint_is_refused_naming_the_converters() -> None:
    with pytest.raises(SpecError, match=r"InternVL2-1B \(qwen\).*InternVL2-4B \(phi\)") as info:
        plan_for(IV, {"source": "hf://someone/InternVL2-Custom"})
    assert info.value.path == "source"


# --- phi3_vision (microsoft/Phi-3-vision-128k-instruct) ----------------------------------------------------------------

PHI = "Phi-3-vision-128k-instruct"
P_HF, P_CKPT, P_ENGINE = f"{W}/hf_models/{PHI}", f"{W}/trt_models/{PHI}/fp16/1-gpu", f"{W}/trt_engines/{PHI}/fp16/1-gpu"

PHI_GOLDEN = {
    "fetch": ["vlmforge", "fetch", "--", f"hf://microsoft/{PHI}", P_HF],
    "convert": ["python", "../phi/convert_checkpoint.py", "--model_dir", P_HF, "--output_dir", P_CKPT,
                "--dtype", "float16"],
    "build-llm": ["trtllm-build", "--checkpoint_dir", P_CKPT, "--output_dir", f"{P_ENGINE}/llm",
                  "--gpt_attention_plugin", "float16", "--gemm_plugin", "float16", "--max_batch_size", "1",
                  "--max_input_len", "4096", "--max_seq_len", "4608", "--max_multimodal_len", "2653"],
    "build-visual": ["python", "build_multimodal_engine.py", "--model_type", "phi-3-vision", "--model_path", P_HF,
                     "--output_dir", f"{P_ENGINE}/vision"],
    "validate": ["python", "run.py", "--hf_model_dir", P_HF, "--engine_dir", P_ENGINE,
                 "--kv_cache_free_gpu_memory_fraction", "0.7"],
}

PHI_README = {
    "convert": "python ../phi/convert_checkpoint.py --model_dir tmp/hf_models/M --output_dir tmp/trt_models/M/fp16/1-gpu "
               "--dtype float16",
    "build-llm": "trtllm-build --checkpoint_dir tmp/trt_models/M/fp16/1-gpu --output_dir tmp/trt_engines/M/fp16/1-gpu/llm "
                 "--gpt_attention_plugin float16 --gemm_plugin float16 --max_batch_size 1 --max_input_len 4096 "
                 "--max_seq_len 4608 --max_multimodal_len 4096",
    "build-visual": "python build_multimodal_engine.py --model_type phi-3-vision --model_path tmp/hf_models/M "
                    "--output_dir tmp/trt_engines/M/fp16/1-gpu/vision",
    "validate": "python run.py --hf_model_dir tmp/hf_models/M --kv_cache_free_gpu_memory_fraction 0.7 "
                "--engine_dir tmp/trt_engines/M/fp16/1-gpu/ "
                "--image_path=https://storage.googleapis.com/sfr-vision-language-research/LAVIS/assets/merlion.png",
}


def test_phi3_vision_plan_is_exact() -> None:
    plan = plan_for(PHI)
    assert [step.name for step in plan.steps] == list(PHI_GOLDEN)
    assert argvs(plan) == PHI_GOLDEN
    assert {step.cwd for step in plan.steps} == {MM}


def test_phi3_vision_plan_is_the_readme_but_for_the_derived_multimodal_len_and_the_image_url() -> None:
    """Deviations, each deliberate: the README's --max_multimodal_len 4096 is its max_input_len; vlmforge derives
    1 x the most tokens one image gives (2653: 16 x 1 HD crops); --image_path (a URL: run.py downloads it) is left
    out, as in every plan (run.py's own image)."""
    ours = argvs(plan_for(PHI))
    for name, command in PHI_README.items():
        expected = readme(command)
        if name == "build-llm":
            expected[expected.index("--max_multimodal_len") + 1] = "2653"
        if name == "validate":
            expected = expected[:expected.index("--image_path")]
        assert normalize(ours[name]) == normalize(expected), name


def test_phi3_vision_tokens_are_the_processors_hd_count() -> None:
    """Phi3VImageProcessor.calc_num_image_tokens: 144 (rc + 1) + 1 + 12 (r + 1); a 336x336 image (1 x 1) gives 313,
    4 x 4 crops 2509, and 16 x 1 the most, 2653."""
    from vlmforge.families.phi3_vision import MAX_TOKENS, hd_tokens

    assert (hd_tokens(1, 1), hd_tokens(4, 4), hd_tokens(16, 1), hd_tokens(1, 16)) == (313, 2509, 2653, 2473)
    assert MAX_TOKENS == 2653
    plan = plan_for(PHI, {"limits.max_batch_size": 2})
    build = argvs(plan)["build-llm"]
    assert build[build.index("--max_multimodal_len") + 1] == "5306"
    explained = {line.name: line for line in plan.derived.explanation}
    assert "144 x (r x c + 1) + 1 + 12 x (r + 1)" in explained["num_visual_features"].formula


# --- cogvlm (THUDM/cogvlm-chat-hf) -------------------------------------------------------------------------------------

COG = "cogvlm-chat-hf"
C_HF, C_CKPT = f"{W}/hf_models/{COG}", f"{W}/trt_models/{COG}/bfloat16/1-gpu"
C_ENGINE, C_TOKENIZER = f"{W}/trt_engines/{COG}/bfloat16/1-gpu", f"{W}/hf_models/vicuna-7b-v1.5"
SED = ("4s/.*//;40s/.*/        out = self.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))"
       ".transpose(1, 2).contiguous()/;41s/.*//;42s/.*//")
PROMPT = " [INST] please describe this image in detail [/INST] "

COG_GOLDEN = {
    "fetch": ["vlmforge", "fetch", "--", f"hf://THUDM/{COG}", C_HF],
    "fetch-tokenizer": ["vlmforge", "fetch", "--", "hf://lmsys/vicuna-7b-v1.5", C_TOKENIZER],
    "patch-visual": ["sed", "-i", "--", SED, f"{C_HF}/visual.py"],
    "convert": ["python", "../../contrib/cogvlm/convert_checkpoint.py", "--use_prompt_tuning", "--model_dir", C_HF,
                "--output_dir", C_CKPT, "--dtype", "bfloat16"],
    "build-llm": ["trtllm-build", "--checkpoint_dir", C_CKPT, "--output_dir", f"{C_ENGINE}/llm",
                  "--gemm_plugin", "bfloat16", "--gpt_attention_plugin", "bfloat16", "--remove_input_padding", "enable",
                  "--max_batch_size", "48", "--max_input_len", "2048", "--max_seq_len", "3076",
                  "--max_multimodal_len", "61440", "--paged_kv_cache", "enable", "--bert_attention_plugin", "disable",
                  "--moe_plugin", "disable"],
    "build-visual": ["python", "build_multimodal_engine.py", "--model_type", "cogvlm", "--model_path", C_HF,
                     "--output_dir", f"{C_ENGINE}/vision", "--max_batch_size", "48"],
    "validate": ["python", "run.py", "--max_new_tokens", "1000", "--input_text", PROMPT, "--hf_model_dir", C_TOKENIZER,
                 "--engine_dir", C_ENGINE, "--batch_size", "1", "--top_p", "0.4", "--top_k", "1", "--temperature",
                 "0.2", "--repetition_penalty", "1.2", "--enable_context_fmha_fp32_acc"],
}

COG_README = {
    "patch-visual": f"sed -i {SED.replace(' ', '_')} visual.py",
    "convert": "python ../../contrib/cogvlm/convert_checkpoint.py --model_dir tmp/hf_models/M  --output_dir "
               "tmp/trt_models/M --dtype bfloat16 --use_prompt_tuning",
    "build-llm": "trtllm-build --checkpoint_dir tmp/trt_models/M --output_dir tmp/trt_engines/M/bf16/1-gpu/llm "
                 "--gemm_plugin bfloat16 --gpt_attention_plugin bfloat16 --remove_input_padding enable "
                 "--max_batch_size 48 --max_input_len 2048 --max_seq_len 3076 --paged_kv_cache enable "
                 "--bert_attention_plugin disable --moe_plugin disable --max_multimodal_len 61440",
    "build-visual": "python build_multimodal_engine.py --model_type cogvlm --model_path tmp/hf_models/M "
                    "--max_batch_size 48 --output_dir tmp/trt_engines/M/bf16/1-gpu/vision",
    "validate": f"python run.py --max_new_tokens 1000 --input_text {PROMPT.replace(' ', '_')} --hf_model_dir "
                "tmp/hf_models/T --engine_dir tmp/trt_engines/M/bf16/1-gpu --batch_size 1 --top_p 0.4 --top_k 1 "
                "--temperature 0.2 --repetition_penalty 1.2 --enable_context_fmha_fp32_acc",
}


def test_cogvlm_plan_is_exact() -> None:
    plan = plan_for(COG)
    assert [step.name for step in plan.steps] == list(COG_GOLDEN)
    assert argvs(plan) == COG_GOLDEN
    assert {step.cwd for step in plan.steps} == {MM}
    patch = next(step for step in plan.steps if step.name == "patch-visual")
    assert patch.edits == [f"{C_HF}/visual.py"]


def test_cogvlm_plan_is_the_readme() -> None:
    """No deviation but where the README's commands run: its sed runs inside the checkpoint folder (`cd`), vlmforge's
    names the file, with `--` before the script (every plan's sed: issue 11 item 13); paths differ only in the
    workspace layout."""
    ours = argvs(plan_for(COG))
    for name, command in COG_README.items():
        expected = [t.replace("_", " ") if t.startswith(("4s/", "_[INST]")) else t for t in readme(command)]
        if name == "patch-visual":
            expected.insert(2, "--")
        assert normalize(ours[name]) == normalize(expected), name


def test_cogvlm_refuses_float16_and_its_budget_follows_the_batch() -> None:
    with pytest.raises(SpecError, match="cogvlm builds in bfloat16 only") as info:
        plan_for(COG, {"dtype": "float16"})
    assert info.value.path == "dtype"
    plan = plan_for(COG, {"limits.max_batch_size": 8, "visual.max_batch_size": 8})
    build = argvs(plan)["build-llm"]
    assert build[build.index("--max_multimodal_len") + 1] == str(8 * 1280)
    with pytest.raises(SpecError, match="visual.max_batch_size: 48"):
        plan_for(COG, {"visual.max_batch_size": 4})


# --- internlm_xcomposer2 (internlm/internlm-xcomposer2-vl-7b) ----------------------------------------------------------

XC = "internlm-xcomposer2-vl-7b"
X_HF, X_CKPT, X_ENGINE = f"{W}/hf_models/{XC}", f"{W}/trt_models/{XC}/fp16/1-gpu", f"{W}/trt_engines/{XC}/fp16/1-gpu"

XC_GOLDEN = {
    "fetch": ["vlmforge", "fetch", "--", f"hf://internlm/{XC}", X_HF],
    "install-requirements": ["pip", "install", "-r", "requirements-internlm-xcomposer2.txt"],
    "convert": ["python", "../internlm2/convert_checkpoint.py", "--model_dir", X_HF, "--output_dir", X_CKPT,
                "--dtype", "float16"],
    "build-llm": ["trtllm-build", "--checkpoint_dir", X_CKPT, "--output_dir", f"{X_ENGINE}/llm",
                  "--gemm_plugin", "float16", "--lora_plugin", "float16", "--lora_dir", ".", "--max_lora_rank", "256",
                  "--max_batch_size", "48", "--max_input_len", "1536", "--max_seq_len", "1736",
                  "--max_multimodal_len", "58800"],
    "build-visual": ["python", "build_multimodal_engine.py", "--model_type", "internlm-xcomposer2", "--model_path",
                     X_HF, "--output_dir", f"{X_ENGINE}/vision", "--max_batch_size", "48"],
    "validate": ["python", "run.py", "--max_new_tokens", "200", "--hf_model_dir", X_HF, "--engine_dir", X_ENGINE,
                 "--batch_size", "1"],
}

XC_README = {
    "install-requirements": "pip install -r requirements-internlm-xcomposer2.txt",
    "convert": "python ../internlm2/convert_checkpoint.py --model_dir tmp/hf_models/M --dtype float16 "
               "--output_dir tmp/trt_models/M/fp16/1-gpu",
    "build-llm": "trtllm-build --checkpoint_dir tmp/trt_models/M/fp16/1-gpu --output_dir trt_engines/M/fp16/1-gpu/llm "
                 "--gemm_plugin float16 --lora_plugin float16 --lora_dir . --max_lora_rank 256 --max_input_len 1536 "
                 "--max_batch_size 48 --max_multimodal_len 58800",
    "build-visual": "python build_multimodal_engine.py --model_type internlm-xcomposer2 --model_path tmp/hf_models/M "
                    "--output_dir trt_engines/M/fp16/1-gpu/vision --max_batch_size 48",
    "validate": "python run.py --max_new_tokens 200 --hf_model_dir tmp/hf_models/M --engine_dir trt_engines/M/fp16/1-gpu "
                "--batch_size 1",
}


def test_internlm_xcomposer2_plan_is_exact() -> None:
    plan = plan_for(XC)
    assert [step.name for step in plan.steps] == list(XC_GOLDEN)
    assert argvs(plan) == XC_GOLDEN
    convert = next(step for step in plan.steps if step.name == "convert")
    assert f"{MM}/adapter_model.bin" in convert.outputs  # the LoRA adapter --lora_dir . reads


def test_internlm_xcomposer2_plan_is_the_readme_but_for_its_sized_max_seq_len() -> None:
    """The one deviation: the README leaves --max_seq_len to trtllm-build's default (the model's position limit);
    vlmforge sizes it as every plan does, max_input_len + max_output_len = 1536 + 200 (run.py's --max_new_tokens)."""
    ours = argvs(plan_for(XC))
    for name, command in XC_README.items():
        expected = readme(command) + (["--max_seq_len", "1736"] if name == "build-llm" else [])
        assert normalize(ours[name]) == normalize(expected), name


# --- neva (a NeMo .nemo archive) ---------------------------------------------------------------------------------------

NEMO = f"{W}/neva.nemo"
N_CKPT, N_ENGINE = f"{W}/trt_models/neva/bfloat16/1-gpu", f"{W}/trt_engines/neva/bfloat16/1-gpu"
RENAMES = ["model:model.language_model", "attention.linear_qkv.layer_norm_bias:input_layernorm.bias",
           "attention.linear_qkv.layer_norm_weight:input_layernorm.weight",
           "mlp.linear_fc1.layer_norm_bias:post_attention_layernorm.bias",
           "mlp.linear_fc1.layer_norm_weight:post_attention_layernorm.weight", "linear_qkv:query_key_value",
           "linear_fc1:dense_h_to_4h", "linear_fc2:dense_4h_to_h", "linear_proj:dense", "decoder:encoder"]

NEVA_GOLDEN = {
    "convert": ["python", "../gpt/convert_checkpoint.py", "--nemo_ckpt_path", NEMO, "--dtype", "bfloat16",
                "--output_dir", N_CKPT, "--nemo_rename_key", *RENAMES],
    "build-llm": ["trtllm-build", "--checkpoint_dir", N_CKPT, "--output_dir", f"{N_ENGINE}/llm",
                  "--gpt_attention_plugin", "bfloat16", "--gemm_plugin", "bfloat16", "--max_batch_size", "1",
                  "--max_input_len", "2048", "--max_seq_len", "2560", "--max_multimodal_len", "729"],
    "build-visual": ["python", "build_multimodal_engine.py", "--model_type", "neva", "--model_path", NEMO,
                     "--output_dir", f"{N_ENGINE}/vision"],
    "validate": ["python", "run.py", "--max_new_tokens", "30", "--input_text", "Question: which city is this? Answer:",
                 "--hf_model_dir", N_CKPT, "--engine_dir", N_ENGINE],
}

NEVA_README = {
    "build-llm": "trtllm-build --checkpoint_dir tmp/trt_models/M --output_dir tmp/trt_engines/M/bf16/1-gpu/llm "
                 "--gpt_attention_plugin bfloat16 --gemm_plugin bfloat16 --max_batch_size 1 --max_input_len 2048 "
                 "--max_seq_len 2560 --max_multimodal_len 729",
    "validate": "python run.py --max_new_tokens 30 --hf_model_dir tmp/trt_models/M --engine_dir tmp/trt_engines/M/bf16/1-gpu "
                "--input_text Question:_which_city_is_this?_Answer:",
}


def test_neva_plan_is_exact_and_the_readmes() -> None:
    """The README's commands: no download (it reads ./neva.nemo; here the spec's file:// path in the container), the
    gpt converter with its ten --nemo_rename_key pairs, the builder on the .nemo, run.py on the converted folder."""
    plan = plan_for("neva")
    assert [step.name for step in plan.steps] == list(NEVA_GOLDEN)
    assert argvs(plan) == NEVA_GOLDEN
    ours = argvs(plan)
    for name, command in NEVA_README.items():
        expected = [t.replace("_", " ") if t.startswith("Question:") else t for t in readme(command)]
        assert normalize(ours[name]) == normalize(expected), name
    # the convert and build-visual commands carry the .nemo path (not a path flag to normalize away): compared whole
    readme_convert = ["python", "../gpt/convert_checkpoint.py", "--nemo_ckpt_path", NEMO, "--dtype", "bfloat16",
                      "--output_dir", N_CKPT, "--nemo_rename_key", *RENAMES]
    assert ours["convert"] == readme_convert
    assert next(step for step in plan.steps if step.name == "convert").inputs == [NEMO]


def test_neva_needs_a_nemo_file_source() -> None:
    with pytest.raises(SpecError, match="file:///workspace/neva.nemo") as info:
        plan_for("neva", {"source": "hf://nvidia/neva-22b"})
    assert info.value.path == "source"
    build = argvs(plan_for("neva", {"architecture.num_visual_features": 576}))["build-llm"]
    assert build[build.index("--max_multimodal_len") + 1] == "576"


# --- shared: dialect 0.9, the hf toolchain, quantization -------------------------------------------------------------

REMOTE = ["InternVL2-4B", PHI, COG, XC, "neva"]


@pytest.mark.parametrize("model", REMOTE)
def test_dialect_09_is_refused_naming_the_release(model: str) -> None:
    family = get_family(catalog_entry(model)["family"])
    with pytest.raises(PlanError, match=(f"{family.name} cannot be planned in dialect 0.9: TensorRT-LLM v0.10.0's "
                                         f".*TensorRT-LLM v1.2.1 builds it.*dialect: '1.2'")):
        plan_for(model, dialect=Dialect.V0_9)


@pytest.mark.parametrize("model", REMOTE)
def test_both_build_toolchains_refuse_before_any_work_naming_the_reason(model: str) -> None:
    from vlmforge.toolchains.hf.stages import check_supported
    from vlmforge.toolchains.trtllm.execute import check_buildable

    resolved = resolve(spec_from_dict(catalog_entry(model)))
    with pytest.raises(ToolchainUnavailable, match=r"plan-only: .*remote code.*vlmforge plan MODEL.*--toolchain trtllm"):
        check_supported(resolved)
    with pytest.raises(ToolchainUnavailable, match="vlmforge plan"):
        check_buildable(resolved.family)


@pytest.mark.parametrize("model", REMOTE)
def test_quantization_and_pp_are_refused_tp_is_planned(model: str) -> None:
    with pytest.raises(SpecError, match="float build only") as info:
        plan_for(model, {"quantization.method": "int8_wo"})
    assert info.value.path == "quantization.method"
    with pytest.raises(SpecError, match="parallel.pp: 1"):
        plan_for(model, {"parallel.tp": 2, "parallel.pp": 2})
    steps = argvs(plan_for(model, {"parallel.tp": 2}))
    assert steps["convert"][steps["convert"].index("--tp_size") + 1] == "2"
    assert steps["validate"][:4] == ["mpirun", "-n", "2", "--allow-run-as-root"]
