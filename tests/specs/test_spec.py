"""Spec loading, derived values and the rules, with the messages users see."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlmforge.errors import PlanError, SpecError, UnknownModel
from vlmforge.families import resolve
from vlmforge.specs.catalog import catalog_names, catalog_specs, load_model_or_spec
from vlmforge.specs.schema import Dialect, load_spec_file, parse_source, spec_json_schema
from vlmforge.toolchains.trtllm.plan import build_plan

SEED_MODELS = {"flan-t5-xl", "flan-t5-xxl", "opt-2.7b", "opt-6.7b", "llava-1.5-7b-hf", "llava-1.5-13b-hf",
               "vila-2.7B", "vila-7B", "vila-13B", "nougat-base", "nougat-small"}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return path


def test_catalog_has_every_seed_model_and_they_all_plan() -> None:
    assert SEED_MODELS <= set(catalog_names())
    for spec in catalog_specs():
        for dialect in Dialect:
            if spec.is_tiny and dialect is Dialect.V0_9 and spec.family.startswith("blip2"):
                continue
            if spec.family in NO_ENGINE_PATH:
                reason = "engine builder has no (Gemma3 multimodal|Qwen2.5-VL) support.*trtllm-serve"
                with pytest.raises(PlanError, match=reason):
                    build_plan(spec, dialect=dialect)
                continue
            if spec.family in LATER_FAMILIES and dialect is Dialect.V0_9:
                with pytest.raises(PlanError, match=f"{spec.family} cannot be planned in dialect 0.9.*v1.2.1 builds it"):
                    build_plan(spec, dialect=dialect)
                continue
            if spec.family in NOT_IN_SEED and dialect is Dialect.V0_9:
                with pytest.raises(PlanError, match="the seed document .* has no Pix2Struct/DePlot section"):
                    build_plan(spec, dialect=dialect)
                continue
            if spec.family in NO_SEED_SECTION and dialect is Dialect.V0_9:
                with pytest.raises(PlanError, match=f"{spec.family} cannot be planned in dialect 0.9: the seed README"):
                    build_plan(spec, dialect=dialect)
                continue
            if spec.name in RUNNER_REFUSES:
                with pytest.raises(PlanError, match=RUNNER_REFUSES[spec.name]):
                    build_plan(spec, dialect=dialect)
                continue
            assert build_plan(spec, dialect=dialect).steps


LATER_FAMILIES = {"llava_next", "llava_onevision", "qwen2_vl", "mistral3", "mllama", "internvl", "phi3_vision",
                  "cogvlm", "internlm_xcomposer2", "neva"}
"""Families TensorRT-LLM 1.2 added: dialect 0.9 (v0.10.0) refuses them, naming the release that has them."""
NOT_IN_SEED = {"pix2struct"}
"""Families v0.10.0's scripts know but the seed document does not describe: dialect 0.9 refuses them."""
NO_SEED_SECTION = {"fuyu", "kosmos2"}
"""Families v0.10.0's builder lists but the seed README has no section for (nor vlmforge a 0.9 gpt-converter table)."""
NO_ENGINE_PATH = {"gemma3", "qwen2_5_vl"}
"""Families no TensorRT-LLM engine release builds (only its PyTorch backend serves them): every plan is refused."""
RUNNER_REFUSES = {"llava-v1.6-vicuna-7b-hf": "Prompt template for lmsys/vicuna-7b-v1.5",
                  "tiny-qwen2-vl": "resizes every image to 504x504",
                  "tiny-mistral3": "takes one image per prompt for --model_type pixtral"}
"""Catalog models 1.2's run.py cannot validate (no prompt template; tiny-qwen2-vl's engines are sized for 112x112
images, run.py feeds 504x504; tiny-mistral3 takes two images per prompt, 1.2's pixtral runner one): the plan says so
instead of writing a failing step."""


@pytest.mark.parametrize(("model", "nvf", "mm"), [
    ("flan-t5-xl", 32, 256), ("opt-2.7b", 32, 256), ("llava-1.5-7b-hf", 576, 576), ("nougat-base", 588, 588),
])
def test_derived_values_follow_the_formulas(model: str, nvf: int, mm: int) -> None:
    derived = resolve(load_model_or_spec(model)).derived
    assert (derived.num_visual_features, derived.max_multimodal_len) == (nvf, mm)


def test_encoder_lengths() -> None:
    assert resolve(load_model_or_spec("flan-t5-xl")).derived.max_encoder_input_len == 924
    assert resolve(load_model_or_spec("nougat-base")).derived.max_encoder_input_len == 588
    assert resolve(load_model_or_spec("nougat-base", {"limits.max_batch_size": 2, "visual.max_batch_size": 2})).derived.max_encoder_input_len == 1176


def test_contradicting_a_formula_names_it_and_both_numbers() -> None:
    with pytest.raises(SpecError) as info:
        resolve(load_model_or_spec("llava-1.5-7b-hf", {"limits.max_batch_size": 2, "visual.max_batch_size": 2,
                                                        "limits.max_multimodal_len": 576}))
    message = str(info.value)
    assert "max_batch_size x num_visual_features = 2 x 576 = 1152" in message and "576" in message
    with pytest.raises(SpecError, match=r"max_input_len \+ max_output_len = 2048 \+ 512 = 2560, but the spec says 3000"):
        resolve(load_model_or_spec("llava-1.5-7b-hf", {"limits.max_seq_len": 3000}))


@pytest.mark.parametrize(("overrides", "path", "words"), [
    ({"quantization.method": "int8_wo"}, "quantization.method", "encoder-decoder"),
    ({"parallel.tp": 3}, "parallel.tp", "must divide"),
    ({"limits.max_batch_size": 16}, "visual.max_batch_size", "smaller than the LLM's max_batch_size"),
])
def test_rules_for_t5(overrides: dict, path: str, words: str) -> None:
    with pytest.raises(SpecError, match=words) as info:
        resolve(load_model_or_spec("flan-t5-xl", overrides))
    assert info.value.path == path


def test_fused_mlp_with_quantization_is_refused() -> None:
    with pytest.raises(SpecError, match="use_fused_mlp cannot be combined"):
        resolve(load_model_or_spec("llava-1.5-7b-hf", {"quantization.method": "int4_wo", "limits.use_fused_mlp": True}))
    # left to the family, fused MLP is simply off when quantized
    assert not resolve(load_model_or_spec("llava-1.5-7b-hf", {"quantization.method": "int4_wo"})).derived.use_fused_mlp


def test_vila_needs_its_code() -> None:
    with pytest.raises(SpecError, match="code_source") as info:
        resolve(load_model_or_spec("vila-7B", {"code_source": ""}))
    assert info.value.path == "code_source"


def test_fp8_records_the_compute_capability() -> None:
    plan = build_plan(load_model_or_spec("llava-1.5-7b-hf", {"quantization.method": "fp8"}))
    assert plan.requirements.min_compute_capability == "8.9"
    assert build_plan(load_model_or_spec("llava-1.5-7b-hf")).requirements.min_compute_capability is None


def test_dialect_refuses_what_its_scripts_lack() -> None:
    from vlmforge.errors import PlanError
    spec = load_model_or_spec("opt-2.7b", {"source": "hf://someone/blip2-opt-custom"})
    assert build_plan(spec, dialect=Dialect.V1_2)
    with pytest.raises(PlanError, match="dialect 0.9: build_visual_engine.py knows blip2-opt only as"):
        build_plan(spec, dialect=Dialect.V0_9)


def test_unknown_model_lists_the_closest() -> None:
    with pytest.raises(UnknownModel, match="closest: llava-1.5-7b-hf"):
        load_model_or_spec("llava-1.5-7b")


def test_malformed_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "name: x\nfamily: llava\nsource: [unclosed\n")
    with pytest.raises(SpecError, match=rf"{path}:\d+:\d+: malformed YAML"):
        load_spec_file(path)


def test_field_errors_name_the_line_and_dotted_path(tmp_path: Path) -> None:
    path = write(tmp_path, "name: x\nfamily: llava\nsource: tiny://llava\nlimits:\n  max_batch_size: 0\n")
    with pytest.raises(SpecError, match=rf"{path}:5: limits.max_batch_size: .*greater than or equal to 1"):
        load_spec_file(path)
    path = write(tmp_path, "name: x\nfamily: llava\nsource: tiny://llava\nlimits:\n  max_batch: 2\n")
    with pytest.raises(SpecError, match="limits.max_batch: unknown key; the allowed keys here are: .*max_batch_size"):
        load_spec_file(path)


def test_sources_parse_and_bad_ones_explain() -> None:
    assert parse_source("hf://llava-hf/llava-1.5-7b-hf@abc").revision == "abc"
    assert parse_source("s3://my-bucket/models/x/").location == "my-bucket/models/x"
    assert parse_source("./weights").scheme == "file"
    with pytest.raises(ValueError, match="unknown source scheme 'ftp'"):
        parse_source("ftp://x/y")


def test_schema_documents_every_field() -> None:
    schema = spec_json_schema()
    assert schema["additionalProperties"] is False
    for name, prop in schema["properties"].items():
        assert prop.get("description"), f"{name} has no description"
    for definition in schema["$defs"].values():
        for name, prop in definition.get("properties", {}).items():
            assert prop.get("description"), f"{definition['title']}.{name} has no description"
