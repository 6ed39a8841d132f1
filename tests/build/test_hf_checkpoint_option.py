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


def test_a_quantized_spec_with_the_folder_is_refused_naming_the_field() -> None:
    spec = load_model_or_spec("tiny-llava", {**ON, "quantization": {"method": "int8_wo"}})
    with pytest.raises(SpecError, match="quantization.method: none") as refused:
        resolve(spec)
    assert "artifacts.hf_checkpoint" in str(refused.value)


def test_the_trtllm_toolchain_refuses_the_folder_before_any_work() -> None:
    with pytest.raises(SpecError, match="--toolchain hf") as refused:
        check_trtllm_buildable(resolve(load_model_or_spec("llava-1.5-7b-hf", ON)))
    assert "artifacts.hf_checkpoint" in str(refused.value)
