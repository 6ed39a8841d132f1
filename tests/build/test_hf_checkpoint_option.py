"""``artifacts.hf_checkpoint``: off (the default) every fingerprint and the spec's dump are those of builds before the
option; on, only the engine stage's fingerprint changes (it then holds the convert stage's checkpoint as ``hf/``);
specs that cannot have the folder are refused before any work."""

from __future__ import annotations

import pytest

from vlmforge.build.fingerprint import fingerprint, spec_for_fingerprint
from vlmforge.build.pipeline import STAGE_CODE_VERSION, hf_fingerprints
from vlmforge.build.trtllm_pipeline import check_trtllm_buildable
from vlmforge.errors import SpecError
from vlmforge.families import resolve
from vlmforge.specs.catalog import load_model_or_spec

ON = {"artifacts": {"hf_checkpoint": True}}


def test_off_the_engine_fingerprint_is_the_formula_of_builds_before_the_option() -> None:
    spec = load_model_or_spec("tiny-llava")
    assert spec.artifacts.hf_checkpoint is False and "artifacts" not in spec.model_dump(mode="json")
    fps = hf_fingerprints(spec)
    before = fingerprint("engine", STAGE_CODE_VERSION, fps.libraries, "v" * 64, "l" * 64, spec_for_fingerprint(spec),
                         fps.resolved.derived.model_dump(mode="json"))  # main's HfFingerprints.engine, written out
    assert fps.engine("v" * 64, "l" * 64, "c" * 64) == fps.engine("v" * 64, "l" * 64, "d" * 64) == before
    explicit = hf_fingerprints(load_model_or_spec("tiny-llava", {"artifacts": {"hf_checkpoint": False}}))
    assert explicit.build_key("r", None) == fps.build_key("r", None)


def test_on_only_the_engine_stage_and_what_follows_it_change() -> None:
    off = hf_fingerprints(load_model_or_spec("tiny-llava"))
    on = hf_fingerprints(load_model_or_spec("tiny-llava", ON))
    fetched = off.fetch("r")
    assert on.fetch("r") == fetched and on.convert(fetched) == off.convert(fetched)
    assert on.visual(on.visual_basis_of(fetched)) == off.visual(off.visual_basis_of(fetched))
    assert on.llm("c" * 64) == off.llm("c" * 64)
    assert on.engine("v" * 64, "l" * 64, "c" * 64) != off.engine("v" * 64, "l" * 64, "c" * 64)
    assert on.engine("v" * 64, "l" * 64, "c" * 64) != on.engine("v" * 64, "l" * 64, "d" * 64)  # the folder's source
    assert on.build_key("r", None) != off.build_key("r", None)


@pytest.mark.parametrize(("quantization", "field", "says"), [
    ({"method": "int8_wo"}, "quantization.method", "int8_wo is served by the hf runner on torch's low-bit kernels"),
    ({"method": "int4_wo"}, "quantization.method", "TensorRT-LLM build-time format"),
    ({"method": "none", "kv_cache_dtype": "fp8"}, "quantization.method", "no quantized weights to export"),
    ({"method": "int8_sq", "kv_cache_dtype": "int8"}, "quantization.kv_cache_dtype", "FP8 KV caches only"),
])
def test_what_the_unified_folder_cannot_hold_is_refused_naming_the_field(quantization: dict, field: str,
                                                                        says: str) -> None:
    spec = load_model_or_spec("tiny-gemma3", {**ON, "quantization": quantization})
    with pytest.raises(SpecError, match=says) as refused:
        resolve(spec)
    assert refused.value.path == field and "artifacts.hf_checkpoint: false" in str(refused.value)


@pytest.mark.parametrize(("model", "says"), [("tiny-vila", "'VilaModel' object has no attribute 'device'"),
                                             ("tiny-blip2-opt", "passes input_ids where BLIP-2 takes pixel_values")])
def test_a_family_whose_unified_export_fails_in_modelopt_is_refused_before_any_work(model: str, says: str) -> None:
    from vlmforge.toolchains.hf.stages import check_supported

    resolved = resolve(load_model_or_spec(model, {**ON, "quantization": {"method": "fp8"}}))
    with pytest.raises(SpecError, match=says) as refused:
        check_supported(resolved)  # HfPipeline's first check, before the fetch
    assert refused.value.path == "artifacts.hf_checkpoint"
    check_supported(resolve(load_model_or_spec(model, ON)))  # its float folder stays


@pytest.mark.parametrize("quantization", [{"method": "int4_awq"}, {"method": "w4a8_awq", "kv_cache_dtype": "fp8"},
                                          {"method": "int8_sq"}, {"method": "fp8", "kv_cache_dtype": "fp8"}])
def test_calibrated_formats_take_the_folder(quantization: dict) -> None:
    resolve(load_model_or_spec("tiny-gemma3", {**ON, "quantization": quantization}))


def test_an_unquantized_folder_keeps_the_fingerprint_of_builds_before_the_unified_one() -> None:
    """On an unquantized spec hf/ is the convert stage's float folder, fingerprinted as before quantized specs took
    the option (the formula written out); the quantize stage is not in it."""
    fps = hf_fingerprints(load_model_or_spec("tiny-llava", ON))
    before = fingerprint("engine", STAGE_CODE_VERSION, fps.libraries, "v" * 64, "l" * 64,
                         ("whole-model-folder", "c" * 64), spec_for_fingerprint(fps.resolved.spec),
                         fps.resolved.derived.model_dump(mode="json"))
    assert fps.engine("v" * 64, "l" * 64, "c" * 64) == fps.engine("v" * 64, "l" * 64, "c" * 64, "q" * 64) == before


def test_a_quantized_folder_puts_its_kind_method_and_quantize_stage_in_the_fingerprints() -> None:
    int4 = {"quantization": {"method": "int4_awq"}}
    off = hf_fingerprints(load_model_or_spec("tiny-gemma3", int4))
    on = hf_fingerprints(load_model_or_spec("tiny-gemma3", {**ON, **int4}))
    fp8 = hf_fingerprints(load_model_or_spec("tiny-gemma3", {**ON, "quantization": {"method": "fp8"}}))
    converted = on.convert(on.fetch("r"))
    assert on.convert(on.fetch("r")) == off.convert(off.fetch("r"))
    # the quantize stage also writes the unified export with the option: its fingerprint says so
    assert on.quantize(converted, "cal") != off.quantize(converted, "cal")
    before = fingerprint("quantize", STAGE_CODE_VERSION, off.libraries, converted,
                         off.resolved.spec.quantization.model_dump(mode="json"), "cal")
    assert off.quantize(converted, "cal") == before  # without the option: as before
    assert on.engine("v" * 64, "l" * 64, "c" * 64, "q" * 64) != on.engine("v" * 64, "l" * 64, "c" * 64, "p" * 64)
    assert on.engine("v" * 64, "l" * 64, "c" * 64, "q" * 64) == on.engine("v" * 64, "l" * 64, "d" * 64, "q" * 64)
    assert on.engine("v" * 64, "l" * 64, "c" * 64, "q" * 64) != fp8.engine("v" * 64, "l" * 64, "c" * 64, "q" * 64)
    assert len({on.build_key("r", "cal"), off.build_key("r", "cal"), fp8.build_key("r", "cal")}) == 3


def test_the_trtllm_toolchain_refuses_the_folder_before_any_work() -> None:
    with pytest.raises(SpecError, match="--toolchain hf") as refused:
        check_trtllm_buildable(resolve(load_model_or_spec("llava-1.5-7b-hf", ON)))
    assert "artifacts.hf_checkpoint" in str(refused.value)


def test_exclusions_are_named_as_the_tensors_are_saved(tmp_path) -> None:
    """Under transformers 4.57 ModelOpt 0.47 kept the in-memory ``model.vision_tower*`` while the tensors were saved
    under the hub's ``vision_tower.*``: mapped back through the model's conversion mapping (both config files)."""
    import json
    from types import SimpleNamespace

    import torch
    from safetensors.torch import save_file

    from vlmforge.toolchains.quantize.whole import align_exclusions

    save_file({"vision_tower.encoder.fc.weight": torch.zeros(2, 2), "language_model.model.layers.0.q.weight":
               torch.zeros(2, 2, dtype=torch.uint8)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "hf_quant_config.json").write_text(json.dumps(
        {"quantization": {"quant_algo": "FP8", "exclude_modules": ["lm_head", "model.vision_tower*"]}}))
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"ignore": ["lm_head",
                                                                                         "model.vision_tower*"]}}))
    model = SimpleNamespace(_checkpoint_conversion_mapping={"^language_model.model": "model.language_model",
                                                            "^vision_tower": "model.vision_tower"})
    assert align_exclusions(tmp_path, model) == ["lm_head", "vision_tower*"]  # lm_head: tied, saved nowhere: kept
    assert json.loads((tmp_path / "hf_quant_config.json").read_text())["quantization"]["exclude_modules"] == \
        ["lm_head", "vision_tower*"]
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["ignore"] == \
        ["lm_head", "vision_tower*"]
    assert align_exclusions(tmp_path, SimpleNamespace()) == ["lm_head", "vision_tower*"]  # 5.x: as saved already
