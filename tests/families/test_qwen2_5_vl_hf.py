"""qwen2_5_vl on the hf toolchain (tiny://qwen2.5-vl): the host's window order against transformers'
``get_vision_window_index``; the five-input visual engine (rows, rope table, window order, window mask, image mask)
against transformers' own window-attention tower at several image sizes and several images per call, in torch and in
ONNX Runtime at other row counts than its export's; M-RoPE positions against Qwen2.5-VL's ``get_rope_index``; the
split path against ``generate`` with two images per prompt; the eager batch state against each request alone; every
TensorRT-LLM plan refused with the reason."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.decoding import assert_batched_as_alone, assert_joins_as_alone, multi_image_prefixes
from tests.helpers.tiny import MAX_NEW_TOKENS, TinyCache
from vlmforge.modeling.images import synthetic_images

NAME = "qwen2.5-vl"
PROMPT = "Which of the two is brighter?"
SIZES = [(112, 112), (120, 60), (50, 100), (140, 84), (200, 60), (64, 64)]
"""(width, height): merged grids 4x4, 2x4, 4x2, 3x5 (windows of 4, 4, 2, 2, 2, 1 units), 2x7 and 2x2 (one window)."""


def images(sizes: list[tuple[int, int]]) -> list:
    return [synthetic_images()[i % 3].resize(size) for i, size in enumerate(sizes)]


def transformers_features(t, pictures: list) -> torch.Tensor:
    processed = t.processor.image_processor(images=pictures, return_tensors="pt")
    with torch.no_grad():
        out = t.model.model.get_image_features(processed["pixel_values"], processed["image_grid_thw"])
    return torch.cat(list(getattr(out, "pooler_output", out)))  # transformers 4.57: the split features themselves


def transformers_window_index(grids: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' window order: ``vision_utils.get_vision_window_index`` in 5, the tower's ``get_window_index``
    in 4.57 (NVIDIA's 1.2 container), on a stand-in holding the sizes it reads."""
    from types import SimpleNamespace

    try:
        from transformers.vision_utils import get_vision_window_index
    except ImportError:
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

        tower = SimpleNamespace(window_size=window, spatial_merge_size=2, patch_size=14, spatial_merge_unit=4)
        order, cu = Qwen2_5_VisionTransformerPretrainedModel.get_window_index(tower, grids)
        return order, torch.unique_consecutive(torch.tensor(cu))
    return get_vision_window_index(grids, 2, window, 14)


@pytest.mark.parametrize("grids", [[(1, 8, 8)], [(1, 6, 10), (1, 4, 14)], [(1, 16, 12), (2, 4, 6), (1, 2, 2)]])
@pytest.mark.parametrize("window", [56, 112])
def test_window_order_equals_transformers(grids: list[tuple[int, int, int]], window: int) -> None:
    """The order and the windows (as transformers' cu_window_seqlens: rows at each window's end) for partial windows,
    several images and a two-frame grid."""
    from vlmforge.families.qwen2_5_vl_hf import window_mask, window_order

    want, cu_want = transformers_window_index(torch.tensor(grids), window)
    order, windows = window_order(grids, window, 14, 2)
    ends = (torch.nonzero(windows[1:] != windows[:-1]).flatten() + 1).tolist() + [windows.numel()]
    assert torch.equal(order, want) and [0, *(4 * end for end in ends)] == cu_want.tolist()
    mask = window_mask(windows, 4)[0]
    assert [int((row == 0).sum()) for row in mask[::4]] == [4 * int((windows == w).sum()) for w in windows]


@pytest.mark.parametrize("sizes", [[size] for size in SIZES] + [SIZES[:3], [SIZES[3], SIZES[4]]],
                         ids=lambda sizes: "+".join(f"{w}x{h}" for w, h in sizes))
def test_visual_module_equals_the_transformers_tower(tiny: TinyCache, sizes: list[tuple[int, int]]) -> None:
    """The host's window order and masks give transformers' own features (its loops over grid_thw), one image or
    several in one call."""
    t = tiny(NAME)
    pictures = images(sizes)
    with torch.no_grad():
        got = t.family.visual_outputs(t.family.visual_module(t.model), t.family.visual_inputs(t.processor, pictures))
    ref = transformers_features(t, pictures)
    assert got.shape == ref.shape and (got - ref).abs().max().item() < 1e-5


def test_the_windows_and_the_image_mask_are_used(tiny: TinyCache) -> None:
    """With the image mask in the windowed layer (no windows) the features change; an image's features are the same
    alone and beside others (the image mask keeps them apart in the full layer)."""
    t = tiny(NAME)
    family, module = t.family, t.family.visual_module(t.model)
    inputs = family.visual_inputs(t.processor, t.images)
    with torch.no_grad():
        together = inputs.split_outputs(family.visual_outputs(module, inputs))
        alone = [family.visual_outputs(module, inputs.select([i])) for i in range(3)]
        feed = family.visual_engine_feeds(inputs.select([0]), 1, t.extras())[0]
        unwindowed = module(*{**feed, "window_mask": feed["attention_mask"]}.values())
    assert all((a - b).abs().max().item() < 1e-5 for a, b in zip(together, alone, strict=True))
    assert (unwindowed - together[0]).abs().max().item() > 1e-3


def test_onnx_engine_matches_the_tower_at_every_row_count(tiny: TinyCache) -> None:
    """Exported on the three golden images (128 rows), run by ONNX Runtime on other images and row counts (one
    image, two, a 3x5 grid of partial windows): equal to transformers' tower; the LLM fed the ONNX features of the
    golden images generates the reference's tokens."""
    from vlmforge.toolchains.hf.onnx import run_onnx_feed

    t = tiny(NAME)
    family = t.family
    info = t.onnx()
    for sizes in ([SIZES[0]], [SIZES[3]], [SIZES[4], SIZES[2]], SIZES[3:]):
        pictures = images(sizes)
        feed = family.visual_engine_feeds(family.visual_inputs(t.processor, pictures), 8, t.extras())[0]
        assert feed["window_index"].dtype == torch.int64
        got = run_onnx_feed(info.path, feed)
        assert (got - transformers_features(t, pictures)).abs().max().item() < 1e-5
    inputs = family.visual_inputs(t.processor, t.images)
    outputs = torch.cat([run_onnx_feed(info.path, feed) for feed in family.visual_engine_feeds(inputs, 1, t.extras())])
    features = [family.pack_visual_features(t.processor, part, size, t.extras())
                for part, size in zip(inputs.split_outputs(outputs), inputs.image_sizes, strict=True)]
    llm = family.extract_llm(t.model)
    assert [family.generate(llm, t.processor, f, t.prompt, MAX_NEW_TOKENS).tokens for f in features] == \
        [r.tokens for r in t.refs]


def test_the_engine_extras_hold_the_window_size(tiny: TinyCache, tmp_path) -> None:
    from vlmforge.families.qwen2_vl import ROPE_FILE

    t = tiny(NAME)
    assert int(t.extras()["window_size"][0]) == 56
    with pytest.raises(FileNotFoundError, match="rope frequencies and window size"):
        t.family.load_visual_extras(tmp_path)
    t.family.save_visual_extras(t.model, tmp_path)
    from safetensors.torch import load_file, save_file

    save_file({"inv_freq": load_file(str(tmp_path / ROPE_FILE))["inv_freq"]}, str(tmp_path / ROPE_FILE))  # qwen2_vl's
    with pytest.raises(FileNotFoundError, match="rebuild the engine"):
        t.family.load_visual_extras(tmp_path)


def test_mrope_positions_equal_get_rope_index(tiny: TinyCache) -> None:
    t = tiny(NAME)
    family, llm = t.family, t.family.extract_llm(t.model)
    pictures = [t.images[2], t.images[0]]
    processed = t.processor(images=pictures, text=family.format_prompt(PROMPT, 2), return_tensors="pt")
    kinds = {"mm_token_type_ids": processed["mm_token_type_ids"]} if "mm_token_type_ids" in processed else {}  # 5
    want, delta = t.model.model.get_rope_index(processed["input_ids"], image_grid_thw=processed["image_grid_thw"],
                                                attention_mask=processed["attention_mask"], **kinds)
    prefix = family.llm_prefix(llm, t.processor, [t.features[2], t.features[0]], PROMPT)
    assert prefix.positions is not None and torch.equal(prefix.positions, want)
    assert prefix.next_position() == prefix.length + int(delta) < prefix.length
    assert type(llm).__name__ == "Qwen2_5_VLForCausalLM"


@pytest.mark.parametrize("order", [(0, 1), (2, 1)])
def test_two_images_split_path_equals_transformers(tiny: TinyCache, order: tuple[int, int]) -> None:
    t = tiny(NAME)
    family, llm = t.family, t.family.extract_llm(t.model)
    pictures = [t.images[i] for i in order]
    ref = family.reference_generate(t.model, t.processor, pictures, PROMPT, MAX_NEW_TOKENS)
    got = family.generate(llm, t.processor, [t.features[i] for i in order], PROMPT, MAX_NEW_TOKENS)
    assert got.tokens == ref.tokens and (got.logits - ref.logits).abs().max().item() < 1e-4


def test_batched_and_inflight_joins_decode_as_alone(tiny: TinyCache) -> None:
    t = tiny(NAME)
    llm = t.family.extract_llm(t.model)
    prefixes = multi_image_prefixes(t, llm, PROMPT)
    assert_batched_as_alone(llm, prefixes, MAX_NEW_TOKENS)
    assert_joins_as_alone(llm, prefixes, [MAX_NEW_TOKENS] * len(prefixes))


def test_the_static_path_refuses_mrope_prefixes(tiny: TinyCache) -> None:
    from vlmforge.runner.static import StaticDecoder

    t = tiny(NAME)
    llm = t.family.extract_llm(t.model)
    decoder = StaticDecoder(llm, max_batch_size=2, length_multiple=32, compile=False, graphs=False)
    with pytest.raises(ValueError, match="M-RoPE"):
        decoder.batch(multi_image_prefixes(t, llm, PROMPT)[:1], 4)


@pytest.mark.parametrize("model", ["Qwen2.5-VL-3B-Instruct", "Qwen2.5-VL-72B-Instruct", "tiny-qwen2.5-vl"])
def test_every_trtllm_plan_is_refused_with_the_reason(model: str) -> None:
    from vlmforge.errors import PlanError
    from vlmforge.toolchains.trtllm.plan import build_plan
    from vlmforge.specs.catalog import load_model_or_spec
    from vlmforge.specs.schema import Dialect

    for dialect in Dialect:
        with pytest.raises(PlanError, match="no Qwen2.5-VL support.*--backend trtllm-serve"):
            build_plan(load_model_or_spec(model), dialect=dialect)


def test_a_checkpoint_window_under_one_merged_unit_is_refused() -> None:
    from vlmforge.errors import SpecError
    from vlmforge.families import get_family
    from vlmforge.specs.catalog import load_model_or_spec

    spec = load_model_or_spec("Qwen2.5-VL-7B-Instruct")
    family = get_family("qwen2_5_vl")
    family.check_checkpoint_config(spec, {"vision_config": {"patch_size": 14, "spatial_merge_size": 2,
                                                            "window_size": 112}})
    with pytest.raises(SpecError, match="window_size 14"):
        family.check_checkpoint_config(spec, {"vision_config": {"window_size": 14}})
