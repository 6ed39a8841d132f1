"""Golden 1.2 plan of DePlot (google/deplot, family pix2struct): every argv exactly, and the 1.2 multimodal README's
"Deplot" commands (NVIDIA/TensorRT-LLM examples/models/core/multimodal/README.md, read at 89fd9b74) reproduced, paths
aside, with each deliberate deviation named; the encoder input budget derived from max_patches and explained; dialect
0.9 refused (the seed document has no DePlot section)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.helpers.seed import SEED, normalize
from vlmforge.errors import PlanError, SpecError
from vlmforge.families import resolve
from vlmforge.plans.model import Plan
from vlmforge.specs.catalog import catalog_entry
from vlmforge.specs.schema import Dialect, merge_overrides, spec_from_dict
from vlmforge.toolchains.trtllm.plan import build_plan

MM = "/app/tensorrt_llm/examples/models/core/multimodal"
W = "/workspace"
HF, CKPT, ENGINE = f"{W}/hf_models/deplot", f"{W}/trt_models/deplot/fp16", f"{W}/trt_engines/deplot/fp16/1-gpu"


def plan_for(overrides: dict[str, Any] | None = None, dialect: Dialect = Dialect.V1_2) -> Plan:
    return build_plan(spec_from_dict(merge_overrides(catalog_entry("deplot"), overrides or {})), dialect=dialect)


def argvs(plan: Plan) -> dict[str, list[str]]:
    return {step.name: step.argv for step in plan.steps}


DEPLOT_GOLDEN = {
    "fetch": ["vlmforge", "fetch", "--", "hf://google/deplot", HF],
    "convert": ["python", "../enc_dec/convert_checkpoint.py", "--model_type", "pix2struct", "--model_dir", HF,
                "--output_dir", CKPT, "--tp_size", "1", "--pp_size", "1", "--dtype", "float16"],
    "build-decoder": ["trtllm-build", "--checkpoint_dir", f"{CKPT}/decoder", "--output_dir", f"{ENGINE}/llm/decoder",
                      "--kv_cache_type", "continuous", "--moe_plugin", "disable", "--gemm_plugin", "float16",
                      "--bert_attention_plugin", "float16", "--gpt_attention_plugin", "float16",
                      "--remove_input_padding", "enable", "--context_fmha", "disable", "--max_beam_width", "1",
                      "--max_batch_size", "8", "--max_seq_len", "511", "--max_input_len", "1",
                      "--max_encoder_input_len", "2048"],
    "build-visual": ["python", "build_multimodal_engine.py", "--model_type", "pix2struct", "--model_path", HF,
                     "--output_dir", f"{ENGINE}/vision", "--max_batch_size", "8"],
    "validate": ["python", "run.py", "--max_new_tokens", "100", "--input_text", "", "--hf_model_dir", HF,
                 "--engine_dir", ENGINE],
}

# The README's commands (steps 1-4 of its "Deplot" section), ${MODEL_NAME} = deplot, continuations joined.
DEPLOT_README = {
    "convert": "python ../enc_dec/convert_checkpoint.py --model_type pix2struct --model_dir tmp/hf_models/deplot "
               "--output_dir tmp/trt_models/deplot/float16 --tp_size 1 --pp_size 1 --dtype float16",
    "build-decoder": "trtllm-build --checkpoint_dir tmp/trt_models/deplot/float16/decoder --output_dir "
                     "tmp/trt_engines/deplot/1-gpu/float16/llm/decoder --paged_kv_cache disable --moe_plugin disable "
                     "--gemm_plugin float16 --bert_attention_plugin float16 --gpt_attention_plugin float16 "
                     "--remove_input_padding enable --context_fmha disable --max_beam_width 1 --max_batch_size 8 "
                     "--max_seq_len 2558 --max_encoder_input_len 2048 --max_input_len 1",
    "build-visual": "python build_multimodal_engine.py --model_type pix2struct --model_path tmp/hf_models/deplot "
                    "--max_batch_size 8 --output_dir tmp/trt_engines/deplot/1-gpu/float16/vision",
    "validate": "python run.py --max_new_tokens 100 --input_text <empty> --hf_model_dir tmp/hf_models/deplot "
                "--engine_dir tmp/trt_engines/deplot/1-gpu/float16",
}


def test_deplot_plan_is_exact() -> None:
    plan = plan_for()
    assert [step.name for step in plan.steps] == list(DEPLOT_GOLDEN)
    assert argvs(plan) == DEPLOT_GOLDEN
    assert {step.cwd for step in plan.steps} == {MM}
    assert plan.requirements.tensorrt_llm == "v1.2.1" and plan.engine_dir == ENGINE


def test_deplot_plan_is_the_readme_but_for_two_named_deviations() -> None:
    """1. ``--paged_kv_cache disable`` is written ``--kv_cache_type continuous``: 1.2's build.py keeps the first as a
    deprecated string flag whose replacement is the second (tests/contract/trtllm_flags.json), and every 1.2
    enc-dec plan here writes it so. 2. ``--max_seq_len 2558`` is 2048 + 510, the encoder's input added to the v0.10
    README's ``--max_output_len 510``: the decoder's own sequence is its start token plus its output, 1 + 510 = 511
    (the cross-attention cache is sized by --max_encoder_input_len)."""
    ours = argvs(plan_for())
    for name, command in DEPLOT_README.items():
        expected = [("" if token == "<empty>" else token) for token in command.split()]
        if name == "build-decoder":
            at = expected.index("--paged_kv_cache")
            expected[at:at + 2] = ["--kv_cache_type", "continuous"]
            expected[expected.index("--max_seq_len") + 1] = "511"
        assert normalize(ours[name]) == normalize(expected), name


def test_the_encoder_input_budget_is_max_patches_and_explained() -> None:
    derived = resolve(spec_from_dict(catalog_entry("deplot"))).derived
    assert derived.max_encoder_input_len == 2048 == derived.num_visual_features
    explained = {e.name: e for e in derived.explanation}
    assert explained["max_encoder_input_len"].formula.startswith("max_patches (architecture.num_visual_features)")
    assert "--max_encoder_input_len" in explained["max_encoder_input_len"].note
    assert explained["max_patches"].value == 2048
    assert explained["visual_placement"].value == "cross_attention"
    # a checkpoint with other max_patches: the budget follows it
    assert argvs(plan_for({"architecture.num_visual_features": 4096}))["build-decoder"][-1] == "4096"


def test_limits_that_cannot_hold_one_image_are_refused() -> None:
    with pytest.raises(SpecError, match=r"max_encoder_input_len must equal max_patches .* = 2048, but the spec says "
                                        r"1024; remove it \(it is derived\)"):
        plan_for({"limits.max_encoder_input_len": 1024})
    with pytest.raises(SpecError, match="does not depend on the image's size|do not depend on the image's size"):
        plan_for({"visual.max_image_size": {"height": 1024, "width": 1024}})
    with pytest.raises(SpecError, match="visual engine's batch"):
        plan_for({"visual.max_batch_size": 4})


def test_dialect_0_9_is_refused_the_seed_has_no_deplot() -> None:
    assert "deplot" not in SEED.read_text().lower() and "pix2struct" not in SEED.read_text().lower()
    with pytest.raises(PlanError, match=r"pix2struct cannot be planned in dialect 0.9: the seed document .* has no "
                                        r"Pix2Struct/DePlot section.*set dialect: '1.2'"):
        plan_for(dialect=Dialect.V0_9)


def test_deplot_passes_the_trtllm_and_the_hf_checks() -> None:
    """Both toolchains take DePlot: the hf toolchain renders its VQA header as transformers does (tiny-pix2struct-vqa
    builds and serves there: tests/runner/test_pix2struct_vqa_serving.py)."""
    from vlmforge.toolchains.hf.stages import check_supported
    from vlmforge.toolchains.trtllm.execute import check_buildable

    resolved = resolve(spec_from_dict(catalog_entry("deplot")))
    check_supported(resolved)
    check_buildable(resolved.family)
