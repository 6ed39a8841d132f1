"""fuyu on the hf toolchain (tiny://fuyu): the patch projection against transformers' own ``vision_embed_tokens`` at
several image sizes (the patch axis dynamic in ONNX Runtime), the prompt's ids against FuyuProcessor's, and the split
path (the Persimmon LLM fed the patch grid) against the float32 ``FuyuForCausalLM.generate``."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.tiny import MAX_NEW_TOKENS, TinyCache
from vlmforge.families.fuyu import FuyuGrid, image_grid
from vlmforge.specs.schema import ImageSize

NAME = "fuyu"
TINY = ImageSize(height=90, width=120)


def test_golden_images_give_three_grids(tiny: TinyCache) -> None:
    t = tiny(NAME)
    inputs = t.family.visual_inputs(t.processor, t.images)
    assert inputs.inputs_per_image == [12, 8, 6]
    assert [tuple(f.shape[1:3]) for f in t.features] == [(3, 4), (2, 4), (3, 2)]
    assert [image_grid(i.height, i.width, TINY) for i in t.images] == [FuyuGrid(3, 4), FuyuGrid(2, 4), FuyuGrid(3, 2)]


@pytest.mark.parametrize("size", [(200, 150), (100, 45), (50, 80), (31, 29), (120, 90)])
def test_patch_features_equal_transformers_at_every_size(tiny: TinyCache, size: tuple[int, int]) -> None:
    """The engine's features are FuyuModel's own patch projection of the processor's patches (to 1e-5)."""
    t = tiny(NAME)
    image = t.images[0].resize(size)
    processed = t.processor(images=[image], text="Describe it.", return_tensors="pt")
    patches = processed["image_patches"]
    patches = patches[0] if isinstance(patches, list) else patches  # transformers 4.57: one tensor per sample
    with torch.no_grad():
        ref = t.model.model.vision_embed_tokens(patches.float()).reshape(-1, 64)
        inputs = t.family.visual_inputs(t.processor, [image])
        got = t.family.visual_outputs(t.family.visual_module(t.model), inputs)
    assert got.shape == ref.shape and (got - ref).abs().max().item() < 1e-5
    grid = image_grid(size[1], size[0], TINY)
    assert got.shape[0] == grid.patches


def test_onnx_engine_takes_every_patch_count(tiny: TinyCache) -> None:
    from vlmforge.toolchains.hf.onnx import compare_onnx_feed

    t = tiny(NAME)
    family, module = t.family, t.family.visual_module(t.model)
    info = t.onnx()
    inputs = family.visual_inputs(t.processor, t.images)
    for pick in ([0], [1], [2], [2, 1]):
        report = compare_onnx_feed(info.path, module, family.visual_engine_feeds(inputs.select(pick), 8, {})[0])
        assert report["max_rel_to_scale"] < 1e-5, report


@pytest.mark.parametrize("prompt", [None, "What is this?", "Question: which city is this? Answer:"])
def test_prompt_ids_equal_the_processor(tiny: TinyCache, prompt: str | None) -> None:
    t = tiny(NAME)
    for image, features in zip(t.images, t.features, strict=True):
        processed = t.processor(images=[image], text=t.family.format_prompt(prompt), return_tensors="pt")
        grid = FuyuGrid(int(features.shape[1]), int(features.shape[2]))
        ids = t.family._prompt_ids(t.processor, prompt, grid)
        assert torch.equal(ids, processed["input_ids"])
        assert int((ids == t.processor.image_token_id).sum()) == grid.patches
        assert t.family.prompt_length(t.processor, prompt, grid.patches) >= ids.shape[1]
    largest = t.features[0]
    assert t.family.prompt_length(t.processor, prompt, 12) == \
        t.family.llm_prefix(t.family.extract_llm(t.model), t.processor, largest, prompt).length


@pytest.mark.parametrize("size", [(200, 150), (100, 45), (50, 80), (60, 60)])
def test_split_path_equals_transformers_at_every_size(tiny: TinyCache, size: tuple[int, int]) -> None:
    t = tiny(NAME)
    family, llm = t.family, t.family.extract_llm(t.model)
    image = t.images[1].resize(size)
    inputs = family.visual_inputs(t.processor, [image])
    with torch.no_grad():
        outputs = family.visual_outputs(family.visual_module(t.model), inputs)
    features = family.pack_visual_features(t.processor, outputs, inputs.image_sizes[0], {})
    ref = family.reference_generate(t.model, t.processor, image, t.prompt, MAX_NEW_TOKENS)
    got = family.generate(llm, t.processor, features, t.prompt, MAX_NEW_TOKENS)
    assert got.tokens == ref.tokens and (got.logits - ref.logits).abs().max().item() < 1e-4


def test_one_image_per_prompt(tiny: TinyCache) -> None:
    t = tiny(NAME)
    with pytest.raises(ValueError, match="one image"):
        t.family.llm_prefix(t.family.extract_llm(t.model), t.processor, t.features[:2], t.prompt)
