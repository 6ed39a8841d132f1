"""qwen2_vl on the hf toolchain (tiny://qwen2-vl): the three-input visual engine (patch rows, rope table, block mask)
against transformers' own vision tower, in torch and in ONNX Runtime at other row counts than it was exported at;
M-RoPE positions against ``get_rope_index``; the split path against ``generate`` with images of several sizes, one or
two per prompt; and the eager batch state (left padding, in-flight joins) against each request alone."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.decoding import assert_batched_as_alone, assert_joins_as_alone, multi_image_prefixes
from tests.helpers.tiny import MAX_NEW_TOKENS, TinyCache
from vlmforge.modeling.generation import LlmPrefix, greedy_prefix

NAME = "qwen2-vl"
PROMPT = "Which of the two is brighter?"


def test_golden_images_give_three_grids_and_the_most_tokens(tiny: TinyCache) -> None:
    t = tiny(NAME)
    inputs = t.family.visual_inputs(t.processor, t.images)
    assert inputs.grids == [(1, 8, 8), (1, 4, 8), (1, 8, 4)] and inputs.output_rows == [16, 8, 8]
    assert [tuple(f.shape[:3]) for f in t.features] == [(1, 4, 4), (1, 2, 4), (1, 4, 2)]


def test_visual_module_equals_the_transformers_tower(tiny: TinyCache) -> None:
    """The rope table and block mask computed on the host give transformers' own features (its loops over
    grid_thw), all images in one call."""
    t = tiny(NAME)
    processed = t.processor.image_processor(images=t.images, return_tensors="pt")
    with torch.no_grad():
        ref = torch.cat(list(t.model.model.get_image_features(processed["pixel_values"],
                                                              processed["image_grid_thw"]).pooler_output))
        got = t.family.visual_outputs(t.family.visual_module(t.model), t.family.visual_inputs(t.processor, t.images))
    assert got.shape == ref.shape == (32, 64)
    assert (got - ref).abs().max().item() < 1e-5


def test_the_block_mask_keeps_images_apart(tiny: TinyCache) -> None:
    """An image's features are the same alone and beside others (without the mask they would attend across)."""
    t = tiny(NAME)
    family, module = t.family, t.family.visual_module(t.model)
    inputs = family.visual_inputs(t.processor, t.images)
    with torch.no_grad():
        together = inputs.split_outputs(family.visual_outputs(module, inputs))
        alone = [family.visual_outputs(module, inputs.select([i])) for i in range(3)]
        feed = family.visual_engine_feeds(inputs, 3, t.extras())[0]
        unmasked = module(feed["rows"], feed["rotary_pos_emb"], torch.zeros_like(feed["attention_mask"]))
    assert all((a - b).abs().max().item() < 1e-5 for a, b in zip(together, alone, strict=True))
    assert (unmasked[:16] - together[0]).abs().max().item() > 1e-3


def test_onnx_engine_matches_torch_at_every_row_count(tiny: TinyCache) -> None:
    """Exported on all three images (64 rows), run by ONNX Runtime on each alone (64, 32, 32 rows) and on two:
    the rows axis is dynamic, and the LLM fed the ONNX features generates the reference's tokens."""
    from vlmforge.toolchains.hf.onnx import compare_onnx_feed, run_onnx_feed

    t = tiny(NAME)
    family, module = t.family, t.family.visual_module(t.model)
    info = t.onnx()
    inputs = family.visual_inputs(t.processor, t.images)
    feeds = [family.visual_engine_feeds(inputs.select(pick), 8, t.extras())[0] for pick in ([0], [1], [2], [2, 1])]
    for feed in feeds:
        report = compare_onnx_feed(info.path, module, feed)
        assert report["max_rel_to_scale"] < 1e-4, report
    outputs = torch.cat([run_onnx_feed(info.path, feed) for feed in feeds[:3]])
    features = [family.pack_visual_features(t.processor, part, size, t.extras())
                for part, size in zip(inputs.split_outputs(outputs), inputs.image_sizes, strict=True)]
    llm = family.extract_llm(t.model)
    assert [family.generate(llm, t.processor, f, t.prompt, MAX_NEW_TOKENS).tokens for f in features] == \
        [r.tokens for r in t.refs]


def test_mrope_positions_equal_get_rope_index(tiny: TinyCache) -> None:
    t = tiny(NAME)
    family, llm = t.family, t.family.extract_llm(t.model)
    images = [t.images[2], t.images[0]]
    processed = t.processor(images=images, text=family.format_prompt(PROMPT, 2), return_tensors="pt")
    want, delta = t.model.model.get_rope_index(processed["input_ids"], processed["mm_token_type_ids"],
                                                processed["image_grid_thw"], attention_mask=processed["attention_mask"])
    prefix = family.llm_prefix(llm, t.processor, [t.features[2], t.features[0]], PROMPT)
    assert prefix.positions is not None and torch.equal(prefix.positions, want)
    assert prefix.next_position() == prefix.length + int(delta) < prefix.length  # the images' rows fold positions
    assert prefix.length == family.prompt_length(t.processor, PROMPT, [8, 16])


@pytest.mark.parametrize("order", [(0, 1), (2, 1), (1, 0)])
def test_two_images_split_path_equals_transformers(tiny: TinyCache, order: tuple[int, int]) -> None:
    t = tiny(NAME)
    family, llm = t.family, t.family.extract_llm(t.model)
    images = [t.images[i] for i in order]
    ref = family.reference_generate(t.model, t.processor, images, PROMPT, MAX_NEW_TOKENS)
    got = family.generate(llm, t.processor, [t.features[i] for i in order], PROMPT, MAX_NEW_TOKENS)
    assert got.tokens == ref.tokens and (got.logits - ref.logits).abs().max().item() < 1e-4


def test_positions_matter(tiny: TinyCache) -> None:
    """Without its M-RoPE positions (0..L-1 instead) the same prefix decodes otherwise: the positions are used."""
    t = tiny(NAME)
    llm = t.family.extract_llm(t.model)
    prefix = t.family.llm_prefix(llm, t.processor, t.features[0], t.prompt)
    plain = LlmPrefix(prefix.kind, prefix.embeds, prefix.mask, prefix.eos)
    with_positions, without = (greedy_prefix(llm, p, MAX_NEW_TOKENS) for p in (prefix, plain))
    assert with_positions.tokens == t.refs[0].tokens
    assert (with_positions.logits[0] - without.logits[0]).abs().max().item() > 1e-3


def test_batched_left_padded_rows_decode_as_alone(tiny: TinyCache) -> None:
    t = tiny(NAME)
    llm = t.family.extract_llm(t.model)
    prefixes = multi_image_prefixes(t, llm, PROMPT)
    assert len({p.length for p in prefixes}) > 2  # rows of several lengths: left padding
    assert_batched_as_alone(llm, prefixes, MAX_NEW_TOKENS)


def test_inflight_joins_decode_as_alone(tiny: TinyCache) -> None:
    """Two requests start, three join at later step boundaries (one longer than the batch's columns, others into
    retired rows): each decodes as alone, positions going on from its own M-RoPE maximum."""
    t = tiny(NAME)
    llm = t.family.extract_llm(t.model)
    assert_joins_as_alone(llm, multi_image_prefixes(t, llm, PROMPT), [3, MAX_NEW_TOKENS, 6, MAX_NEW_TOKENS, 4])


def test_the_static_path_refuses_mrope_prefixes(tiny: TinyCache) -> None:
    from vlmforge.runner.static import StaticDecoder

    t = tiny(NAME)
    llm = t.family.extract_llm(t.model)
    decoder = StaticDecoder(llm, max_batch_size=2, length_multiple=32, compile=False, graphs=False)
    with pytest.raises(ValueError, match="M-RoPE"):
        decoder.batch(multi_image_prefixes(t, llm, PROMPT)[:1], 4)
