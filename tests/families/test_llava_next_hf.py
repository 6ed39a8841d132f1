"""LLaVA-NeXT on the hf toolchain, with tiny://llava-next: anyres tiles through the visual module, the family's packing
(unpadding + newline embeddings) against transformers' own, token counts against the plan's budgets, and several
images of different sizes in one prompt."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers.tiny import MAX_NEW_TOKENS, TinyCache, pack_features, tiny_spec
from vlmforge.errors import SpecError
from vlmforge.families import get_family, resolve
from vlmforge.families.llava_next import NEWLINE_KEY, NEWLINES_FILE, TINY, anyres_count
from vlmforge.modeling.images import synthetic_images
from vlmforge.specs.catalog import catalog_specs

NAME = "llava-next"
# (width, height): square, wide, tall, tiny, larger than every pinpoint, extreme aspect ratios
SIZES = [(64, 64), (90, 40), (40, 90), (20, 20), (300, 200), (200, 30), (30, 200), (56, 56), (57, 28)]


def images_of(sizes: list[tuple[int, int]]) -> list:
    base = synthetic_images()
    return [base[i % 3].resize(size) for i, size in enumerate(sizes)]


def reference_features(t, images: list) -> list[torch.Tensor]:
    """transformers' own visual path (get_image_features: tower, projector, pack_image_features), per image."""
    inputs = t.processor.image_processor(images=images, return_tensors="pt")
    with torch.no_grad():
        out = t.model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"],
                                               vision_feature_layer=-2, vision_feature_select_strategy="default")
    return [part[None] for part in out.pooler_output]


def family_features(t, images: list) -> list[torch.Tensor]:
    inputs = t.family.visual_inputs(t.processor, images)
    with torch.no_grad():
        outputs = t.family.visual_module(t.model)(inputs.pixels)
    return pack_features(t.family, t.processor, images, outputs, t.model, t.work / "extras-family")


def test_packing_equals_transformers_for_every_image_shape(tiny: TinyCache) -> None:
    t = tiny(NAME)
    images = images_of(SIZES)
    got, want = family_features(t, images), reference_features(t, images)
    assert [g.shape for g in got] == [w.shape for w in want]
    for g, w in zip(got, want, strict=True):
        assert torch.allclose(g, w, atol=1e-6)
    # each image's tiles are its own: 1 thumbnail + its pinpoint's tiles (the processor pads a batch to the most)
    inputs = t.family.visual_inputs(t.processor, images)
    assert inputs.inputs_per_image == [anyres_count(h, w, TINY.pinpoints, TINY.tile, TINY.patch).tiles
                                       for w, h in SIZES]
    assert len(set(inputs.inputs_per_image)) > 1 and inputs.image_sizes[1] == (40, 90)


def test_token_counts_are_the_plans_and_the_budget_holds_the_largest(tiny: TinyCache) -> None:
    """Every image's packed rows = anyres_count (what the plan counts) = what LlavaNextProcessor expands <image> to;
    the tiny entry's derived budgets are the most any image gives."""
    t = tiny(NAME)
    images = images_of(SIZES)
    counts = [int(f.shape[1]) for f in family_features(t, images)]
    assert counts == [anyres_count(h, w, TINY.pinpoints, TINY.tile, TINY.patch).tokens for w, h in SIZES]
    for image, count in zip(images, counts, strict=True):
        ids = t.processor(images=[image], text="<image>", return_tensors="pt").input_ids
        assert int((ids == t.processor.image_token_id).sum()) == count
    derived = resolve(tiny_spec(NAME)).derived
    explained = {e.name: e.value for e in derived.explanation}
    assert derived.num_visual_features == max(counts) == 24
    assert explained["visual_inputs_per_image"] == max(t.family.visual_inputs(t.processor, images).inputs_per_image)
    assert derived.max_multimodal_len == 4 * 2 * 24 and derived.visual_max_batch_size >= 4 * 2 * 5
    config = json.loads((t.model_dir / "config.json").read_text())
    assert t.family.architecture_facts(config).num_visual_features == 24


def test_images_of_different_sizes_in_one_prompt_match_transformers(tiny: TinyCache) -> None:
    t = tiny(NAME)
    family = t.family
    llm = family.extract_llm(t.model)
    images = images_of([(90, 40), (64, 64)])
    prompt = family.format_prompt("Which of the two is brighter?", 2)
    assert prompt == "[INST] <image>\n<image>\nWhich of the two is brighter? [/INST]"
    features = family_features(t, images)
    ref = family.reference_generate(t.model, t.processor, images, prompt, MAX_NEW_TOKENS)
    with torch.no_grad():
        got = family.generate(llm, t.processor, features, prompt, MAX_NEW_TOKENS)
        swapped = family.generate(llm, t.processor, features[::-1], prompt, MAX_NEW_TOKENS)
    assert got.tokens == ref.tokens and (got.logits - ref.logits).abs().max().item() < 1e-4
    assert (swapped.logits[0] - ref.logits[0]).abs().max().item() > 0.05  # each image counts in its place
    assert family.prompt_length(t.processor, prompt, [f.shape[1] for f in features]) == \
        family.llm_prefix(llm, t.processor, features, prompt).length


def test_the_newline_embedding_is_written_as_the_builder_does_and_required(tiny: TinyCache, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    t = tiny(NAME)
    t.family.save_visual_extras(t.model, tmp_path)
    saved = load_file(str(tmp_path / NEWLINES_FILE))
    assert list(saved) == [NEWLINE_KEY] and torch.equal(saved[NEWLINE_KEY], t.model.model.image_newline.detach())
    with pytest.raises(FileNotFoundError, match=f"{NEWLINES_FILE}: a llava_next visual engine needs"):
        t.family.load_visual_extras(tmp_path / "elsewhere")


def test_a_checkpoint_tiling_otherwise_than_the_plan_counted_is_refused(tiny: TinyCache) -> None:
    t = tiny(NAME)
    family = t.family
    config = json.loads((t.model_dir / "config.json").read_text())
    family.check_checkpoint_config(tiny_spec(NAME), config)  # its own entry: fine
    real = next(spec for spec in catalog_specs() if spec.name == "llava-v1.6-mistral-7b-hf")
    with pytest.raises(SpecError, match="tiles with .*tile=28.* but the budgets were counted with .*tile=336"):
        family.check_checkpoint_config(real, config)
    with pytest.raises(SpecError, match="vision_feature_select_strategy 'full'"):
        family.check_checkpoint_config(tiny_spec(NAME), {**config, "vision_feature_select_strategy": "full"})


def test_llava_next_is_built_by_the_hf_toolchain_and_its_plans_stay() -> None:
    family = get_family("llava_next")
    assert family.hf_supported and family.tiny_source == "tiny://llava-next"
    assert family.visual_model_type(None) == "llava_next"  # the 1.2 builder's --model_type
