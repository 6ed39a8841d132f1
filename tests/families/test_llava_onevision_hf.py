"""LLaVA-OneVision: anyres_max_9 counts against transformers' processor (recorded and live), the largest image within
visual.max_image_size against brute force, and on the hf toolchain with tiny://llava-onevision: the family's packing
(unpadding, bilinear downsampling, newline embeddings) against transformers' own, token counts against the plan's
budgets, several images per prompt (one padded tile each) against transformers' generate() and batched as alone, and
the refusals (video, a checkpoint tiling otherwise)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from tests.helpers.tiny import TinyCache, pack_features, tiny_spec
from vlmforge.errors import SpecError
from vlmforge.families import get_family, resolve
from vlmforge.families.llava_next import NEWLINE_KEY, NEWLINES_FILE
from vlmforge.families.llava_onevision import (
    ONEVISION,
    TINY,
    largest_counts,
    onevision_count,
    tiles_of,
)
from vlmforge.modeling.images import synthetic_images
from vlmforge.specs.catalog import catalog_specs
from vlmforge.specs.schema import ImageSize

NAME = "llava-onevision"
# Measured with transformers 5.24's LlavaOnevisionProcessor and llava-onevision-qwen2-*-ov-hf's preprocessor settings,
# counting placeholder tokens: /work/scratch/families15/token_counts.json. Keys (width, height).
MEASURED = {  # (tokens, visual-engine inputs = tiles + thumbnail)
    (224, 224): (1485, 2), (336, 336): (1485, 2), (504, 504): (3699, 5), (640, 480): (2929, 5),
    (1024, 768): (4725, 7), (1920, 1080): (7269, 16), (2048, 2048): (7371, 37), (300, 1200): (3753, 5),
}
# (width, height): the golden sizes, tiny, larger than every pinpoint, extreme aspect ratios, downsampled ones
SIZES = [(64, 64), (100, 80), (45, 130), (20, 20), (300, 200), (200, 30), (30, 200), (168, 168), (150, 60),
         (57, 28), (120, 110)]


def brute_force(height: int, width: int, geometry=TINY) -> int:
    return max(onevision_count(h, w, geometry).tokens for h in range(1, height + 1) for w in range(1, width + 1))


@pytest.mark.parametrize(("wh", "measured"), MEASURED.items(), ids=str)
def test_count_matches_the_processor(wh: tuple[int, int], measured: tuple[int, int]) -> None:
    width, height = wh
    count = onevision_count(height, width)
    assert (count.tokens, tiles_of(count.pinpoint, 384)) == measured
    assert count.tokens == 729 + count.rows * count.cols + count.rows


def test_counts_equal_transformers_arithmetic_on_random_sizes() -> None:
    """Live: transformers' LlavaOnevisionProcessor._get_number_of_features with the published geometry, 300 sizes."""
    from vlmforge.families.llava_onevision import _image_processor_class
    from vlmforge.families.tinykit import make_fast_tokenizer, pil_image_processor

    images = pil_image_processor("LlavaOnevisionImageProcessor", size={"height": 384, "width": 384},
                                 image_grid_pinpoints=[list(pin) for pin in ONEVISION.pinpoints])
    processor = _image_processor_class()(image_processor=images, tokenizer=make_fast_tokenizer(),
                                         num_image_tokens=729, vision_feature_select_strategy="full")
    rng = random.Random(0)
    for _ in range(300):
        height, width = rng.randint(1, 3000), rng.randint(1, 3000)
        assert processor._get_number_of_features(height, width, 384, 384) == onevision_count(height, width).tokens


@pytest.mark.parametrize(("height", "width"), [(64, 64), (130, 45), (90, 140), (168, 168), (30, 168), (85, 57)])
def test_the_largest_image_is_the_maximum_over_every_size(height: int, width: int) -> None:
    """Within the largest pinpoint the bound is every image's maximum (tiny geometry, every size checked)."""
    top, tiles = largest_counts(ImageSize(height=height, width=width), TINY)
    assert top.tokens == brute_force(height, width)
    assert tiles == max(tiles_of(onevision_count(h, w, TINY).pinpoint, 28)
                        for h in range(1, height + 1) for w in range(1, width + 1))


def test_beyond_the_largest_pinpoint_the_count_is_an_upper_bound() -> None:
    assert largest_counts(ImageSize(height=200, width=180), TINY)[0].tokens >= brute_force(200, 180)
    assert largest_counts(ImageSize(height=2304, width=2304))[0].tokens == 8765
    assert largest_counts(ImageSize(height=4000, width=3000))[0].tokens >= 8765


def test_the_real_maximum_lies_just_under_the_downsampling_threshold() -> None:
    """8765 tokens: a 1156x946 image lands on the 1536x1152 pinpoint, whose 108x81 grid unpads to 98x81 (7938
    patches, ratio 1.0999: not downsampled); a square 2048x2048 image is downsampled to 7371."""
    count = onevision_count(1156, 946)
    assert (count.pinpoint, count.unpadded, count.tokens) == ((1536, 1152), (98, 81), 8765)
    assert onevision_count(2048, 2048).tokens == 7371
    assert largest_counts(ImageSize(height=1024, width=1024))[0].tokens == 7371  # 1152x1152 pinpoints at most


# --- the hf toolchain ------------------------------------------------------------------------------------------------

def images_of(sizes: list[tuple[int, int]]) -> list:
    base = synthetic_images()
    return [base[i % 3].resize(size) for i, size in enumerate(sizes)]


def reference_features(t, images: list) -> list[torch.Tensor]:
    """transformers' own visual path (get_image_features: tower, projector, pack_image_features), per image."""
    inputs = t.processor.image_processor(images=images, return_tensors="pt")
    with torch.no_grad():
        out = t.model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"], vision_feature_layer=-1,
                                               vision_feature_select_strategy="full",
                                               vision_aspect_ratio="anyres_max_9")
    return [part[None] for part in image_features_of(out)]


def image_features_of(out) -> list[torch.Tensor]:
    """get_image_features' per-image features: its pooler_output (transformers 5), the list itself (4.57)."""
    return list(out.pooler_output if hasattr(out, "pooler_output") else out)


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
    counts = [onevision_count(h, w, TINY) for w, h in SIZES]
    assert any(c.unpadded != (c.rows, c.cols) for c in counts)  # bilinear downsampling is exercised
    inputs = t.family.visual_inputs(t.processor, images)
    assert inputs.inputs_per_image == [tiles_of(c.pinpoint, TINY.tile) for c in counts]


def test_token_counts_are_the_plans_and_the_budget_holds_the_largest(tiny: TinyCache) -> None:
    t = tiny(NAME)
    images = images_of(SIZES)
    counts = [int(f.shape[1]) for f in family_features(t, images)]
    assert counts == [onevision_count(h, w, TINY).tokens for w, h in SIZES]
    for image, count in zip(images, counts, strict=True):
        ids = t.processor(images=[image], text="<image>", return_tensors="pt").input_ids
        assert int((ids == t.processor.image_token_id).sum()) == count
    derived = resolve(tiny_spec(NAME)).derived
    assert derived.num_visual_features == 54 >= max(counts)
    assert [int(f.shape[1]) for f in t.features] == [46, 39, 54]  # the golden images: one is the largest
    assert derived.max_multimodal_len == 4 * 54 and derived.visual_max_batch_size == 4 * 37
    config = json.loads((t.model_dir / "config.json").read_text())
    assert t.family.architecture_facts(config).num_visual_features == 54


def test_the_processor_loads_without_a_video_processor(tiny: TinyCache) -> None:
    """transformers' video processors need torchvision: the family loads the image part alone, with its settings."""
    t = tiny(NAME)
    processor = t.family.load_processor(t.model_dir)
    assert (processor.num_image_tokens, processor.vision_feature_select_strategy,
            processor.vision_aspect_ratio) == (4, "full", "anyres_max_9")
    assert processor.image_token_id == t.model.config.image_token_id


def test_the_newline_embedding_is_written_as_the_builder_does_and_required(tiny: TinyCache, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    t = tiny(NAME)
    t.family.save_visual_extras(t.model, tmp_path)
    saved = load_file(str(tmp_path / NEWLINES_FILE))
    assert list(saved) == [NEWLINE_KEY] and torch.equal(saved[NEWLINE_KEY], t.model.model.image_newline.detach())
    with pytest.raises(FileNotFoundError, match=f"{NEWLINES_FILE}: a llava_onevision visual engine needs"):
        t.family.load_visual_extras(tmp_path / "elsewhere")


def test_a_checkpoint_tiling_otherwise_than_the_plan_counted_is_refused(tiny: TinyCache) -> None:
    t = tiny(NAME)
    family = t.family
    config = json.loads((t.model_dir / "config.json").read_text())
    family.check_checkpoint_config(tiny_spec(NAME), config)
    real = next(spec for spec in catalog_specs() if spec.name == "llava-onevision-qwen2-0.5b-ov-hf")
    with pytest.raises(SpecError, match="tiles with .*tile=28.* but the budgets were counted with .*tile=384"):
        family.check_checkpoint_config(real, config)
    with pytest.raises(SpecError, match="vision_aspect_ratio 'anyres_max_4'"):
        family.check_checkpoint_config(tiny_spec(NAME), {**config, "vision_aspect_ratio": "anyres_max_4"})
    with pytest.raises(SpecError, match="vision_feature_select_strategy 'default'"):
        family.check_checkpoint_config(tiny_spec(NAME), {**config, "vision_feature_select_strategy": "default"})


def test_video_is_refused_clearly_and_several_images_are_formatted() -> None:
    family = get_family("llava_onevision")
    assert family.format_prompt("Hi?") == "<|im_start|>user <image>\nHi?<|im_end|><|im_start|>assistant\n"
    assert family.format_prompt("Compare them.", 2) == \
        "<|im_start|>user <image><image>\nCompare them.<|im_end|><|im_start|>assistant\n"
    with pytest.raises(ValueError, match=r"video input \(<video>\) is not supported yet"):
        family.format_prompt("<video>\nWhat happens?")
    assert family.hf_supported and family.tiny_source == "tiny://llava-onevision"
    assert family.visual_model_type(None) == "llava_onevision" and family.llm_kind == "qwen"
    assert family.images_per_prompt_limit is None
    assert "an image among several of a prompt: one padded tile, 4 + 1 newline" in \
        family.visual_token_formula(tiny_spec(NAME), ImageSize(height=168, width=168))


# --- several images per prompt: one padded tile each (transformers' batch_num_images > 1) ---------------------------

MULTI_PROMPT = "Compare the pictures."
MULTI_SIZES = [(100, 80), (45, 130), (64, 64), (200, 30)]  # (width, height): wide, tall, square, very wide


def prompt_features(t, images: list, images_in_prompt: list[int]) -> list[torch.Tensor]:
    """The runner's path: the family's preprocessing for each image's prompt, the visual module, the packing."""
    inputs = t.family.prompt_visual_inputs(t.processor, images, images_in_prompt)
    with torch.no_grad():
        outputs = t.family.visual_module(t.model)(inputs.pixels)
    t.work.joinpath("extras-multi").mkdir(parents=True, exist_ok=True)
    t.family.save_visual_extras(t.model, t.work / "extras-multi")
    extras = t.family.load_visual_extras(t.work / "extras-multi")
    return [t.family.pack_visual_features(t.processor, part, size, extras)
            for part, size in zip(inputs.split_outputs(outputs), inputs.image_sizes, strict=True)]


def test_images_among_several_take_one_padded_tile_as_transformers_packs_them(tiny: TinyCache) -> None:
    t = tiny(NAME)
    images = images_of(MULTI_SIZES)
    inputs = t.family.prompt_visual_inputs(t.processor, images, [2, 2, 1, 2])
    alone = onevision_count(64, 64, TINY)
    assert inputs.inputs_per_image == [1, 1, tiles_of(alone.pinpoint, TINY.tile), 1]
    got = prompt_features(t, images, [2, 2, 1, 2])
    assert [int(f.shape[1]) for f in got] == [4 + 1, 4 + 1, alone.tokens, 4 + 1]
    several = t.processor.image_processor(images=[[images[0], images[1], images[3]]], return_tensors="pt")
    with torch.no_grad():
        want = t.model.model.get_image_features(several["pixel_values"], several["image_sizes"],
                                                vision_feature_layer=-1, vision_feature_select_strategy="full",
                                                vision_aspect_ratio="anyres_max_9",
                                                batch_num_images=several["batch_num_images"])
    want = image_features_of(want)
    for g, w in zip([got[0], got[1], got[3]], want, strict=True):
        assert torch.allclose(g[0], w, atol=1e-6)
    assert torch.equal(got[2], family_features(t, [images[2]])[0])  # alone: tiled as before
    ids = t.processor(images=[[images[0], images[1]]], text="<image><image>", return_tensors="pt").input_ids
    assert int((ids == t.processor.image_token_id).sum()) == 2 * (4 + 1)
    with pytest.raises(ValueError, match="images_in_prompt has 1 entries for 4 images"):
        t.family.prompt_visual_inputs(t.processor, images, [2])


@pytest.mark.parametrize("order", [(0, 1), (1, 2), (3, 0, 2)], ids=str)
def test_several_images_of_different_sizes_equal_transformers_generate(tiny: TinyCache,
                                                                        order: tuple[int, ...]) -> None:
    """Float32 on the CPU: the same greedy tokens as transformers' generate() given the images nested as one prompt
    (processor and model with batch_num_images), and teacher-forced logits within 1e-4."""
    t = tiny(NAME)
    family, llm = t.family, t.family.extract_llm(t.model)
    images = [images_of(MULTI_SIZES)[i] for i in order]
    ref = family.reference_generate(t.model, t.processor, images, MULTI_PROMPT, 16)
    features = prompt_features(t, images, [len(images)] * len(images))
    got = family.generate(llm, t.processor, features, family.format_prompt(MULTI_PROMPT, len(images)), 16)
    assert got.tokens == ref.tokens and (got.logits - ref.logits).abs().max().item() < 1e-4
    tiled = family.generate(llm, t.processor, family_features(t, images),  # each image tiled as if alone: not it
                            family.format_prompt(MULTI_PROMPT, len(images)), 16)
    assert tiled.logits.shape != got.logits.shape or (tiled.logits - got.logits).abs().max().item() > 1e-3


def test_a_batch_of_one_and_two_image_prompts_decodes_as_each_alone(tiny: TinyCache) -> None:
    from tests.helpers.decoding import assert_batched_as_alone, assert_joins_as_alone

    t = tiny(NAME)
    llm = t.family.extract_llm(t.model)
    images = images_of(MULTI_SIZES)
    requests = [([0], t.prompt), ([1, 2], MULTI_PROMPT), ([2], "What is this?"), ([3, 0], None), ([1], t.prompt)]
    prefixes = []
    for indexes, text in requests:
        features = prompt_features(t, [images[i] for i in indexes], [len(indexes)] * len(indexes))
        prefixes.append(t.family.llm_prefix(llm, t.processor, features, text))
    assert len({p.length for p in prefixes}) > 2
    alone = assert_batched_as_alone(llm, prefixes, 12)
    assert len({tuple(a.tokens) for a in alone}) > 1
    assert_joins_as_alone(llm, prefixes, [3, 12, 6, 12, 4])
