"""llava_next and qwen2_vl: their token formulas against the real processors' counts, the largest image within
visual.max_image_size, and the budgets derived from it (refused before any work when the limits cannot hold it)."""

from __future__ import annotations

from typing import Any

import pytest

from vlmforge.errors import SpecError
from vlmforge.families import get_family, resolve
from vlmforge.families.llava_next import anyres_count, largest_counts
from vlmforge.families.qwen2_vl import MAX_PIXELS, image_tokens, largest_tokens, smart_resize
from vlmforge.specs.catalog import load_model_or_spec
from vlmforge.specs.schema import ImageSize

# Measured with transformers 5.24's LlavaNextProcessor / Qwen2VLProcessor (Pil image processors) and the published
# checkpoints' preprocessor settings, counting placeholder tokens: /work/scratch/families15/token_counts.py ->
# token_counts.json. Keys (width, height) as the script writes them.
LLAVA_NEXT_MEASURED = {  # (tokens, visual-engine inputs = tiles + thumbnail)
    (224, 224): (1176, 3), (336, 336): (1176, 3), (504, 504): (2928, 5), (640, 480): (2340, 5),
    (1024, 768): (2340, 5), (1920, 1080): (1948, 5), (2048, 2048): (2928, 5), (300, 1200): (1944, 4),
}
QWEN2_VL_MEASURED = {  # max_pixels 12845056 (the Instruct checkpoints'): (tokens, grid (t, h, w) in 14-px patches)
    (224, 224): (64, (1, 16, 16)), (336, 336): (144, (1, 24, 24)), (504, 504): (324, (1, 36, 36)),
    (640, 480): (391, (1, 34, 46)), (1024, 768): (999, (1, 54, 74)), (1920, 1080): (2691, (1, 78, 138)),
    (2048, 2048): (5329, (1, 146, 146)), (300, 1200): (473, (1, 86, 22)),
}
QWEN2_VL_MEASURED_1003520 = {(1920, 1080): 1222, (2048, 2048): 1225, (1024, 768): 999}
"""max_pixels 1280*28*28, the value Qwen's model card suggests."""


@pytest.mark.parametrize(("wh", "measured"), LLAVA_NEXT_MEASURED.items(), ids=str)
def test_llava_next_count_matches_the_processor(wh: tuple[int, int], measured: tuple[int, int]) -> None:
    width, height = wh
    count = anyres_count(height, width)
    assert (count.tokens, count.tiles) == measured
    assert count.tokens == 576 + count.rows * count.cols + count.rows


@pytest.mark.parametrize(("wh", "measured"), QWEN2_VL_MEASURED.items(), ids=str)
def test_qwen2_vl_count_matches_the_processor(wh: tuple[int, int], measured: tuple[int, tuple[int, int, int]]) -> None:
    width, height = wh
    tokens, (_, grid_h, grid_w) = measured
    assert smart_resize(height, width) == (grid_h * 14, grid_w * 14)
    assert image_tokens(height, width) == tokens == grid_h * grid_w // 4


def test_qwen2_vl_count_with_a_smaller_max_pixels() -> None:
    for (width, height), tokens in QWEN2_VL_MEASURED_1003520.items():
        assert image_tokens(height, width, max_pixels=1003520) == tokens


def test_qwen2_vl_refuses_extreme_aspect_ratios_as_the_processor_does() -> None:
    with pytest.raises(ValueError, match="aspect ratio at most 200"):
        smart_resize(10, 2100)


@pytest.mark.parametrize(("height", "width"), [(120, 260), (260, 90), (100, 100), (340, 60)])
def test_llava_next_largest_image_is_the_maximum_over_every_size(height: int, width: int) -> None:
    """The candidates (box, its square, each pinpoint's shape) give the same maxima as every image within the box
    (checked here on small boxes; on 336x336, 200x300, 400x250, 336x1008, 150x700, 700x120 and 500x500 too, once)."""
    every = [anyres_count(h, w) for h in range(1, height + 1) for w in range(1, width + 1)]
    tokens, tiles = largest_counts(ImageSize(height=height, width=width))
    assert tokens.tokens == max(c.tokens for c in every)
    assert tiles.tiles == max(c.tiles for c in every)


def test_llava_next_most_tokens_is_2928_from_337_pixels_up() -> None:
    assert largest_counts(ImageSize(height=672, width=672))[0].tokens == 2928
    assert largest_counts(ImageSize(height=4000, width=3000))[0].tokens == 2928
    assert largest_counts(ImageSize(height=336, width=336))[0].tokens == 1752  # a 336x220 image, not the square
    assert largest_counts(ImageSize(height=336, width=1008))[1].tiles == 4


@pytest.mark.parametrize(("height", "width"), [(300, 200), (504, 504), (130, 600), (1000, 700)])
def test_qwen2_vl_largest_image_bounds_every_size(height: int, width: int) -> None:
    """Unclamped boxes: the box's own count is the maximum; clamped ones (max_pixels 50176 here): max_pixels / 784,
    which no image exceeds."""
    step = 7
    sizes = [(h, w) for h in range(28, height + 1, step) for w in range(28, width + 1, step)] + [(height, width)]
    box = ImageSize(height=height, width=width)
    assert largest_tokens(box)[0] == max(image_tokens(h, w) for h, w in sizes) == image_tokens(height, width)
    bound = largest_tokens(box, max_pixels=50176)[0]
    assert bound >= max(image_tokens(h, w, max_pixels=50176) for h, w in sizes)
    assert largest_tokens(ImageSize(height=8000, width=8000))[0] == MAX_PIXELS // 784 == 16384


# --- budgets --------------------------------------------------------------------------------------------------------

def spec(model: str, **overrides: Any) -> Any:
    return load_model_or_spec(model, overrides)


def test_catalog_budgets() -> None:
    mistral = resolve(spec("llava-v1.6-mistral-7b-hf")).derived
    assert (mistral.num_visual_features, mistral.max_multimodal_len, mistral.visual_max_batch_size) == (2928, 2928, 5)
    assert str(mistral.max_image_size) == "672x672"
    qwen = resolve(spec("Qwen2-VL-7B-Instruct")).derived
    assert (qwen.num_visual_features, qwen.max_multimodal_len, qwen.visual_max_batch_size) == (324, 1296, 4)
    assert get_family("qwen2_vl").visual_contract(spec("Qwen2-VL-7B-Instruct")).position_id_dims == 3


def test_the_visual_engine_batch_counts_llava_next_tiles() -> None:
    with pytest.raises(SpecError, match=r"1 x 1 x 5 = 5.*set visual.max_batch_size: 5") as info:
        resolve(spec("llava-v1.6-mistral-7b-hf", **{"visual.max_batch_size": None}))
    assert info.value.path == "visual.max_batch_size"
    derived = resolve(spec("llava-v1.6-mistral-7b-hf", **{"limits.max_batch_size": 2, "visual.max_batch_size": 10,
                                                           "limits.max_input_len": 3500})).derived
    assert derived.max_multimodal_len == 2 * 2928


def test_a_spec_that_cannot_hold_its_largest_image_is_refused_naming_size_tokens_and_fix() -> None:
    with pytest.raises(SpecError) as info:
        resolve(spec("Qwen2-VL-7B-Instruct", **{"visual.max_image_size": {"height": 1080, "width": 1920}}))
    message = str(info.value)
    assert info.value.path == "limits.max_input_len"
    for part in ("1080x1920", "2691 tokens", "smart_resize to 1092x1932", "(1092/14) x (1932/14) / 4",
                 "raise limits.max_input_len to at least 2691", "lower visual.max_image_size"):
        assert part in message, part
    with pytest.raises(SpecError, match=r"2 x 2928 = 5856 tokens.*lower limits.max_images_per_prompt"):
        resolve(spec("llava-v1.6-mistral-7b-hf", **{"limits.max_images_per_prompt": 2, "visual.max_batch_size": 10}))


def test_a_qwen2_vl_box_the_processor_refuses_is_a_spec_error() -> None:
    with pytest.raises(SpecError, match=r"visual.max_image_size 1x300: .*aspect ratio at most 200") as info:
        resolve(spec("Qwen2-VL-2B-Instruct", **{"visual.max_image_size": {"height": 1, "width": 300}}))
    assert info.value.path == "visual.max_image_size"


def test_the_fixed_count_field_is_refused_for_size_dependent_families() -> None:
    with pytest.raises(SpecError, match="depend on each image's size") as info:
        resolve(spec("Qwen2-VL-2B-Instruct", **{"architecture.num_visual_features": 324}))
    assert info.value.path == "architecture.num_visual_features"


def test_explain_says_how_each_family_number_was_reached() -> None:
    lines = {line.name: line for line in resolve(spec("llava-v1.6-mistral-7b-hf")).derived.explanation}
    assert "576 thumbnail + 48x48 unpadded grid + 48 newlines" in lines["num_visual_features"].formula
    assert lines["visual_inputs_per_image"].value == 5 and "2x2 tiles" in lines["visual_inputs_per_image"].formula
    assert lines["max_num_tokens"].value == 4096
    lines = {line.name: line for line in resolve(spec("Qwen2-VL-7B-Instruct")).derived.explanation}
    assert (lines["max_hw_dims"].value, lines["min_hw_dims"].value) == (1296, 16)
    assert "4 x 324" in lines["max_hw_dims"].formula and "--max_hw_dims" in lines["max_hw_dims"].note


def test_explain_says_whether_the_size_is_the_specs_or_the_familys() -> None:
    own = {line.name: line for line in resolve(spec("Qwen2-VL-7B-Instruct")).derived.explanation}
    assert own["num_visual_features"].formula.endswith("at visual.max_image_size 504x504")
    default = resolve(spec("Qwen2-VL-7B-Instruct", **{"visual.max_image_size": None})).derived
    lines = {line.name: line for line in default.explanation}
    assert default.num_visual_features == 324
    assert lines["num_visual_features"].formula.endswith(
        "at qwen2_vl's default largest image 504x504 (set visual.max_image_size to change it)")


def test_the_counts_equal_transformers_processors_on_random_sizes() -> None:
    """Live, beside the recorded counts above: transformers' LlavaNextProcessor (the llava-v1.6 checkpoints' settings,
    placeholder tokens counted) and Qwen2VLImageProcessor (grid t*h*w / 4) on 40 random image sizes each."""
    import random

    from PIL import Image
    from transformers import LlavaNextProcessor

    from vlmforge.families.llava_next import DEFAULT_PINPOINTS
    from vlmforge.families.qwen2_vl import MIN_PIXELS
    from vlmforge.families.tinykit import IMAGE_ID, make_fast_tokenizer, pil_image_processor

    llava_images = pil_image_processor("LlavaNextImageProcessor", size={"shortest_edge": 336},
                                       crop_size={"height": 336, "width": 336},
                                       image_grid_pinpoints=[list(pin) for pin in DEFAULT_PINPOINTS])
    llava = LlavaNextProcessor(image_processor=llava_images, tokenizer=make_fast_tokenizer(), patch_size=14,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    qwen = pil_image_processor("Qwen2VLImageProcessor", size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
                               patch_size=14, merge_size=2, temporal_patch_size=2)
    rng = random.Random(0)
    for _ in range(40):
        width, height = rng.randint(20, 1600), rng.randint(20, 1600)
        inputs = llava(text="<image>hi", images=Image.new("RGB", (width, height)), return_tensors="pt")
        count = anyres_count(height, width)
        assert (int((inputs["input_ids"] == IMAGE_ID).sum()), int(inputs["pixel_values"].shape[1])) == (
            count.tokens, count.tiles), (height, width)
        width, height = rng.randint(28, 2600), rng.randint(28, 2600)
        t, h, w = qwen(Image.new("RGB", (width, height)), return_tensors="pt")["image_grid_thw"][0].tolist()
        assert t * h * w // 4 == image_tokens(height, width), (height, width)
