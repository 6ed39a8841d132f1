"""The visual contract's budgets: tokens of the largest image x images per prompt x batch, refused before any work
when the limits cannot hold them, and today's specs unchanged to the byte."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import pytest

from vlmforge.build.fingerprint import fingerprint, spec_for_fingerprint
from vlmforge.errors import SpecError
from vlmforge.families import family_names, get_family, resolve
from vlmforge.families.llava import LlavaFamily
from vlmforge.specs.catalog import catalog_specs, load_model_or_spec
from vlmforge.specs.derived import Derived, derive
from vlmforge.specs.schema import BuildSpec, ImageSize, spec_from_dict
from vlmforge.specs.visual import VisualPlacement
from vlmforge.toolchains.trtllm.plan import build_plan

DERIVED_KEYS_BEFORE = {
    "num_visual_features", "max_multimodal_len", "max_input_len", "max_output_len", "max_seq_len",
    "max_encoder_input_len", "visual_max_batch_size", "world_size", "encoder_decoder", "use_fused_mlp",
    "max_new_tokens", "min_compute_capability",
}
"""What a derived dump held before the visual contract: manifests and fingerprints of earlier builds."""

PLACEMENTS = {"llava": VisualPlacement.PROMPT, "vila": VisualPlacement.PROMPT, "blip2-opt": VisualPlacement.PROMPT,
              "blip2-t5": VisualPlacement.ENCODER_INPUT, "nougat": VisualPlacement.CROSS_ATTENTION}


class TiledLlava(LlavaFamily):
    """A test-only family whose tokens depend on the image's size: 14-pixel patches of the image itself, in
    336-pixel tiles plus a thumbnail (LLaVA-NeXT's shape, simplified)."""

    size_dependent_tokens: ClassVar[bool] = True
    default_max_image_size: ClassVar[ImageSize | None] = ImageSize(height=448, width=448)

    def visual_tokens(self, spec: BuildSpec, size: ImageSize | None) -> int:
        assert size is not None
        return (size.height // 14) * (size.width // 14)

    def visual_engine_inputs(self, spec: BuildSpec, size: ImageSize | None) -> int:
        assert size is not None
        return math.ceil(size.height / 336) * math.ceil(size.width / 336) + 1


def llava(**overrides: Any) -> BuildSpec:
    return load_model_or_spec("llava-1.5-7b-hf", overrides)


def tiled(**limits_and_visual: Any) -> BuildSpec:
    data: dict[str, Any] = {"name": "t", "family": "llava", "source": "tiny://llava", **limits_and_visual}
    return spec_from_dict(data)


def test_the_contract_of_every_registered_family() -> None:
    assert set(PLACEMENTS) <= set(family_names())
    for name in family_names():
        family = get_family(name)
        if family.size_dependent_tokens:  # llava_next, qwen2_vl: tests/families/test_later_families.py
            continue
        for spec in (s for s in catalog_specs() if s.family == name):
            contract = family.visual_contract(spec)
            assert contract.tokens_per_image == family.num_visual_features(spec)
            assert not contract.size_dependent and contract.engine_inputs_per_image == 1
            assert contract.position_id_dims == 1 and not contract.dynamic_spatial_axes
        if name in PLACEMENTS:
            assert family.visual_placement is PLACEMENTS[name]
    assert get_family("llava").images_per_prompt_limit is None
    assert {get_family(n).images_per_prompt_limit for n in ("vila", "blip2-opt", "blip2-t5", "nougat")} == {1}


def test_every_catalog_spec_dumps_plans_and_fingerprints_as_before() -> None:
    """The new spec, derived and engine.json fields are left out at their defaults: earlier manifests, plans and
    fingerprints read the same (the 204 plans of the catalog were compared with main's, byte for byte)."""
    for spec in catalog_specs():
        if get_family(spec.family).size_dependent_tokens:
            continue  # families added with the visual contract: their derived dumps hold max_image_size
        if not get_family(spec.family).plan_dialects:
            continue  # families added later with no engine plan (gemma3: every plan is refused)
        derived = resolve(spec).derived
        dumped = derived.model_dump(mode="json")
        assert set(dumped) == DERIVED_KEYS_BEFORE, spec.name
        assert derived.max_multimodal_len == spec.limits.max_batch_size * derived.num_visual_features
        assert "max_images_per_prompt" not in spec.model_dump(mode="json")["limits"]
        assert "max_image_size" not in spec.model_dump(mode="json")["visual"]
        assert "explanation" not in build_plan(spec).to_json_dict()["derived"]
        assert Derived.model_validate(dumped).model_dump(mode="json") == dumped
    # the spec says 1 out loud: still the same build
    spec = llava()
    same = llava(**{"limits.max_images_per_prompt": 1})
    assert fingerprint(spec_for_fingerprint(spec)) != fingerprint(spec_for_fingerprint(same))  # the spec differs
    assert resolve(same).derived.model_dump() == resolve(spec).derived.model_dump()


def test_two_images_per_prompt_double_the_prompt_table() -> None:
    spec = llava(**{"limits.max_images_per_prompt": 2, "limits.max_batch_size": 2, "visual.max_batch_size": 4})
    derived = resolve(spec).derived
    assert (derived.max_multimodal_len, derived.max_images_per_prompt, derived.visual_max_batch_size) == (2304, 2, 4)
    assert derived.model_dump(mode="json")["max_images_per_prompt"] == 2
    build = next(step.argv for step in build_plan(spec).steps if step.name == "build-llm")
    assert build[build.index("--max_multimodal_len") + 1] == "2304"
    visual = next(step.argv for step in build_plan(spec).steps if step.name == "build-visual")
    assert "--max_batch_size" not in visual  # 4: the builder's own default
    with pytest.raises(SpecError) as info:
        resolve(llava(**{"limits.max_images_per_prompt": 2, "limits.max_batch_size": 2, "visual.max_batch_size": 4,
                         "limits.max_multimodal_len": 1152}))
    assert "max_batch_size x max_images_per_prompt x num_visual_features = 2 x 2 x 576 = 2304" in str(info.value)


def test_the_visual_batch_must_take_every_image_of_a_batch() -> None:
    with pytest.raises(SpecError) as info:
        resolve(llava(**{"limits.max_images_per_prompt": 2, "limits.max_batch_size": 4}))
    assert info.value.path == "visual.max_batch_size"
    message = str(info.value)
    assert "max_batch_size x max_images_per_prompt x inputs per image = 4 x 2 x 1 = 8" in message
    assert "the visual builder's default" in message and "set visual.max_batch_size: 8 or more" in message


def test_a_prompt_too_short_for_its_images_is_refused_naming_the_count_and_fix() -> None:
    with pytest.raises(SpecError) as info:
        resolve(llava(**{"limits.max_images_per_prompt": 4, "visual.max_batch_size": 4}))
    assert info.value.path == "limits.max_input_len"
    message = str(info.value)
    assert "max_input_len (2048) cannot hold the visual tokens of 4 images (4 x 576 = 2304 tokens" in message
    assert "raise limits.max_input_len to at least 2304 plus the text or lower limits.max_images_per_prompt" in message
    # one image: today's message
    with pytest.raises(SpecError, match=r"smaller than one image's visual features \(576\)"):
        resolve(llava(**{"limits.max_input_len": 500, "limits.max_output_len": 100}))
    # BLIP-2 T5's encoder input holds the 32 query rows too
    with pytest.raises(SpecError, match=r"cannot hold the visual tokens of one image \(32 tokens") as t5:
        resolve(load_model_or_spec("flan-t5-xl", {"limits.max_input_len": 16}))
    assert t5.value.path == "limits.max_input_len" and "encoder input holds them" in str(t5.value)


@pytest.mark.parametrize(("model", "path"), [("opt-2.7b", "limits.max_images_per_prompt"),
                                             ("flan-t5-xl", "limits.max_images_per_prompt"),
                                             ("nougat-base", "limits.max_images_per_prompt"),
                                             ("vila-7B", "limits.max_images_per_prompt")])
def test_one_image_families_refuse_more(model: str, path: str) -> None:
    with pytest.raises(SpecError, match=r"takes at most 1 image per prompt, but limits.max_images_per_prompt is 2: "
                                        r"set it to 1 or less") as info:
        resolve(load_model_or_spec(model, {"limits.max_images_per_prompt": 2}))
    assert info.value.path == path


def test_fixed_size_families_refuse_a_max_image_size() -> None:
    with pytest.raises(SpecError, match=r"llava resizes every image .* visual tokens \(576\) do not depend on the "
                                        r"image's size: remove visual.max_image_size") as info:
        resolve(llava(**{"visual.max_image_size": {"height": 1024, "width": 768}}))
    assert info.value.path == "visual.max_image_size"


def test_image_size_fields_are_checked(tmp_path: Any) -> None:
    with pytest.raises(SpecError, match=r"visual.max_image_size.height: .*greater than or equal to 1"):
        tiled(visual={"max_image_size": {"height": 0, "width": 10}})
    with pytest.raises(SpecError, match=r"visual.max_image_size.depth: unknown key"):
        tiled(visual={"max_image_size": {"height": 10, "width": 10, "depth": 3}})
    with pytest.raises(SpecError, match=r"limits.max_images_per_prompt: .*less than or equal to 64"):
        tiled(limits={"max_images_per_prompt": 65})


def test_a_size_dependent_family_counts_its_largest_image() -> None:
    family = TiledLlava()
    derived = derive(tiled(visual={"max_batch_size": 5}), family)  # default 448x448: 32 x 32 tokens, 2 x 2 tiles + 1
    assert (derived.num_visual_features, derived.max_multimodal_len, derived.max_image_size) == (
        1024, 1024, ImageSize(height=448, width=448))
    assert derived.model_dump(mode="json")["max_image_size"] == {"height": 448, "width": 448}
    with pytest.raises(SpecError) as info:  # batch 1 x 1 image x 5 inputs > the builder's 4
        derive(tiled(), family, visual_builder_default_batch=4)
    assert info.value.path == "visual.max_batch_size" and "1 x 1 x 5 = 5" in str(info.value)
    spec = tiled(limits={"max_input_len": 4096, "max_images_per_prompt": 2, "max_batch_size": 2},
                 visual={"max_batch_size": 20, "max_image_size": {"height": 336, "width": 1008}})
    derived = derive(spec, family)
    assert (derived.num_visual_features, derived.max_multimodal_len, derived.visual_max_batch_size) == (
        1728, 2 * 2 * 1728, 20)
    explained = {e.name: e for e in derived.explanation}
    assert explained["num_visual_features"].formula == "llava's token count at visual.max_image_size 336x1008"
    assert explained["max_multimodal_len"].formula == (
        "max_batch_size x max_images_per_prompt x num_visual_features = 2 x 2 x 1728")


def test_a_spec_that_cannot_hold_its_largest_image_names_size_tokens_and_fix() -> None:
    spec = tiled(limits={"max_input_len": 2048}, visual={"max_batch_size": 8, "max_image_size": {"height": 1024,
                                                                                                 "width": 768}})
    with pytest.raises(SpecError) as info:
        derive(spec, TiledLlava())
    assert info.value.path == "limits.max_input_len"
    message = str(info.value)
    assert "cannot hold the visual tokens of one image of 1024x768 (3942 tokens, llava's token count)" in message
    assert "raise limits.max_input_len to at least 3942 plus the text or lower visual.max_image_size" in message


def test_every_derived_number_is_explained() -> None:
    for spec in catalog_specs():
        derived = resolve(spec).derived
        explained = {e.name: e.value for e in derived.explanation}
        for name, value in derived.model_dump().items():
            if name in ("encoder_decoder", "max_image_size") or (name == "max_encoder_input_len" and value is None):
                continue
            assert explained[name] == value, (spec.name, name)


def test_engine_json_names_the_image_limit_only_beyond_one(tmp_path: Any) -> None:
    from vlmforge.artifacts.engine_config import EngineConfig, LlmEngineInfo, VisualEngineInfo

    fields: dict[str, Any] = dict(
        name="m", family="llava", toolchain="hf", world_size=1, tp=1, pp=1, max_batch_size=1, max_input_len=2048,
        max_output_len=512, num_visual_features=576, processor="processor",
        visual=VisualEngineInfo(path="vision/model.onnx", format="onnx", precision="float32", max_batch_size=4,
                                output_shape=["batch", 576, 64]),
        llm=LlmEngineInfo(path="llm", format="safetensors", dtype="float16", quantization="none", architecture="L"))
    one = EngineConfig(**fields)
    assert "max_images_per_prompt" not in one.model_dump_json()  # earlier engines' engine.json, byte for byte
    two = EngineConfig(**fields, max_images_per_prompt=2)
    two.write(tmp_path)
    assert EngineConfig.read(tmp_path).max_images_per_prompt == 2
