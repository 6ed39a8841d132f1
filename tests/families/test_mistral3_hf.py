"""mistral3 on the hf toolchain (tiny://mistral3): the three-input visual engine (patch rows, grid positions, image
ids) against transformers' own Pixtral tower and projector, in torch and in ONNX Runtime at other row counts than it
was exported at; the prompt's [IMG]/[IMG_BREAK]/[IMG_END] expansion against the model's reference path; the split path
against ``generate`` with images of several sizes, one or two per prompt; and the batch state against each alone."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.decoding import assert_batched_as_alone, assert_joins_as_alone, multi_image_prefixes
from tests.helpers.tiny import MAX_NEW_TOKENS, TinyCache
from vlmforge.families.mistral3 import merged_grid
from vlmforge.families.mistral3_hf import IMG, IMG_BREAK, IMG_END, expand_images
from vlmforge.modeling.generation import LlmPrefix, greedy_prefix

NAME = "mistral3"
PROMPT = "Which of the two is brighter?"


def reference_features(t, images) -> torch.Tensor:
    """transformers' own features for ``images`` in one batch (padded to the largest, cropped by image_sizes): each
    image's part of ``pooler_output`` (transformers 5) or of the returned tuple (4.57, NVIDIA's 1.2 image)."""
    processed = t.processor.preprocess(images)
    with torch.no_grad():
        out = t.model.model.get_image_features(processed["pixel_values"], processed["image_sizes"])
    return torch.cat(list(getattr(out, "pooler_output", out)))


def test_golden_images_give_three_grids() -> None:
    """32x32 keeps its size; 48x20 is scaled to 32x13, then up to 32x16; 20x28 goes up to 24x32."""
    assert [merged_grid(h, w, 32, 4, 2) for h, w in ((32, 32), (20, 48), (28, 20))] == [(4, 4), (2, 4), (4, 3)]
    assert merged_grid(1540, 1540) == (55, 55) and merged_grid(1080, 1920) == (31, 55)  # Mistral-Small-3.1
    assert merged_grid(224, 224) == (8, 8) and merged_grid(2048, 2048) == (55, 55)


def test_golden_features_are_merged_grids(tiny: TinyCache) -> None:
    t = tiny(NAME)
    inputs = t.family.visual_inputs(t.processor, t.images)
    assert inputs.grids == [(1, 8, 8), (1, 4, 8), (1, 8, 6)] and inputs.output_rows == [16, 8, 12]
    assert inputs.pixels.shape == (64 + 32 + 48, 3 * 4 * 4)
    assert [tuple(f.shape[:3]) for f in t.features] == [(1, 4, 4), (1, 2, 4), (1, 4, 3)]


def test_visual_module_equals_the_transformers_tower(tiny: TinyCache) -> None:
    """Host-computed rows, positions and image ids give transformers' own features (its loops over image_sizes,
    its padded batch), all three images in one call, to 1e-5."""
    t = tiny(NAME)
    ref = reference_features(t, t.images)
    got = t.family.visual_outputs(t.family.visual_module(t.model), t.family.visual_inputs(t.processor, t.images))
    assert got.shape == ref.shape == (36, 64)
    assert (got - ref).abs().max().item() < 1e-5


def test_the_block_mask_and_positions_matter(tiny: TinyCache) -> None:
    """An image's features are the same alone and beside others; without the image ids (one block) or with the rows'
    positions scrambled they differ, by far more than the 1e-5 they agree to otherwise: both inputs are used."""
    t = tiny(NAME)
    family, module = t.family, t.family.visual_module(t.model)
    inputs = family.visual_inputs(t.processor, t.images)
    with torch.no_grad():
        together = inputs.split_outputs(family.visual_outputs(module, inputs))
        alone = [family.visual_outputs(module, inputs.select([i])) for i in range(3)]
        feed = family.visual_engine_feeds(inputs, 3, {})[0]
        one_block = module(feed["rows"], feed["positions"], torch.zeros_like(feed["image_ids"]))
        scrambled = module(feed["rows"], feed["positions"].flip(0), feed["image_ids"])
    assert all((a - b).abs().max().item() < 1e-5 for a, b in zip(together, alone, strict=True))
    assert (one_block[:16] - together[0]).abs().max().item() > 1e-3
    assert (scrambled[:16] - together[0]).abs().max().item() > 1e-4  # 10x the equality tolerance (tiny tower: ~9e-4)


def test_onnx_engine_matches_torch_at_every_row_count(tiny: TinyCache) -> None:
    """Exported on all three images (144 rows), run by ONNX Runtime on each alone (64, 32, 48 rows) and on two: the
    rows axis is dynamic, and the LLM fed the ONNX features generates the reference's tokens."""
    from vlmforge.toolchains.hf.onnx import compare_onnx_feed, run_onnx_feed

    t = tiny(NAME)
    family, module = t.family, t.family.visual_module(t.model)
    info = t.onnx()
    inputs = family.visual_inputs(t.processor, t.images)
    feeds = [family.visual_engine_feeds(inputs.select(pick), 8, {})[0] for pick in ([0], [1], [2], [2, 1])]
    for feed in feeds:
        report = compare_onnx_feed(info.path, module, feed)
        assert report["max_rel_to_scale"] < 1e-4, report
    outputs = torch.cat([run_onnx_feed(info.path, feed) for feed in feeds[:3]])
    assert (outputs - reference_features(t, t.images)).abs().max().item() < 1e-5  # the export is transformers' tower
    features = [family.pack_visual_features(t.processor, part, size, {})
                for part, size in zip(inputs.split_outputs(outputs), inputs.image_sizes, strict=True)]
    llm = family.extract_llm(t.model)
    assert [family.generate(llm, t.processor, f, t.prompt, MAX_NEW_TOKENS).tokens for f in features] == \
        [r.tokens for r in t.refs]


def test_prompt_expansion_is_the_processors() -> None:
    assert expand_images(f"[INST]{IMG}Hi[/INST]", [(2, 3)]) == \
        f"[INST]{IMG * 3}{IMG_BREAK}{IMG * 3}{IMG_END}Hi[/INST]"
    assert expand_images(f"{IMG}a{IMG}", [(1, 1), (1, 2)]) == f"{IMG}{IMG_END}a{IMG * 2}{IMG_END}"
    with pytest.raises(ValueError, match=r"for 2 image\(s\) holds exactly 2 \[IMG\]"):
        expand_images(f"{IMG}", [(1, 1), (1, 1)])


def test_prefix_ids_equal_the_reference_inputs_and_prompt_length_bounds_them(tiny: TinyCache) -> None:
    """The prefix is as long as the processor's input_ids for the same images; prompt_length, given only the [IMG]
    count, is exact for the tallest grid of that count and at least the prefix for every other one."""
    t = tiny(NAME)
    family, llm = t.family, t.family.extract_llm(t.model)
    for order in ([0], [1], [2, 0]):
        images = [t.images[i] for i in order]
        processed = t.processor(images=images, text=family.format_prompt(PROMPT, len(images)))
        prefix = family.llm_prefix(llm, t.processor, [t.features[i] for i in order], PROMPT)
        assert prefix.length == processed["input_ids"].shape[1]
        counts = [int(t.features[i][0, ..., 0].numel()) for i in order]
        assert family.prompt_length(t.processor, PROMPT, counts) >= prefix.length
    tall = family.llm_prefix(llm, t.processor, t.features[0], PROMPT)  # 4x4: 4 rows, the most at 16 tokens
    assert family.prompt_length(t.processor, PROMPT, 16) == tall.length


@pytest.mark.parametrize("order", [(0, 1), (2, 1), (1, 0)])
def test_two_images_split_path_equals_transformers(tiny: TinyCache, order: tuple[int, int]) -> None:
    t = tiny(NAME)
    family, llm = t.family, t.family.extract_llm(t.model)
    images = [t.images[i] for i in order]
    ref = family.reference_generate(t.model, t.processor, images, PROMPT, MAX_NEW_TOKENS)
    got = family.generate(llm, t.processor, [t.features[i] for i in order], PROMPT, MAX_NEW_TOKENS)
    assert got.tokens == ref.tokens and (got.logits - ref.logits).abs().max().item() < 1e-4


def test_breaks_are_the_llms_own_tokens(tiny: TinyCache) -> None:
    """[IMG_BREAK]/[IMG_END] are embedded by the LLM (text), only [IMG] takes image rows: a prefix whose break rows
    were replaced by image rows decodes otherwise."""
    t = tiny(NAME)
    llm = t.family.extract_llm(t.model)
    prefix = t.family.llm_prefix(llm, t.processor, t.features[0], t.prompt)
    ids = t.family._prompt_ids(t.processor, t.prompt, [(4, 4)])
    breaks = (ids == t.processor.tokenizer.convert_tokens_to_ids(IMG_BREAK))[0]
    embeds = prefix.embeds.clone()
    embeds[0, breaks] = prefix.embeds[0, ids[0] == t.processor.image_token_id][:int(breaks.sum())]
    moved = greedy_prefix(llm, LlmPrefix(prefix.kind, embeds, prefix.mask, prefix.eos), MAX_NEW_TOKENS)
    assert greedy_prefix(llm, prefix, MAX_NEW_TOKENS).tokens == t.refs[0].tokens
    assert (moved.logits[0] - t.refs[0].logits[0]).abs().max().item() > 1e-3


def test_batched_left_padded_rows_decode_as_alone(tiny: TinyCache) -> None:
    t = tiny(NAME)
    llm = t.family.extract_llm(t.model)
    prefixes = multi_image_prefixes(t, llm, PROMPT)
    assert len({p.length for p in prefixes}) > 2  # rows of several lengths: left padding
    assert_batched_as_alone(llm, prefixes, MAX_NEW_TOKENS)


def test_inflight_joins_decode_as_alone(tiny: TinyCache) -> None:
    t = tiny(NAME)
    llm = t.family.extract_llm(t.model)
    assert_joins_as_alone(llm, multi_image_prefixes(t, llm, PROMPT), [3, MAX_NEW_TOKENS, 6, MAX_NEW_TOKENS, 4])


def test_features_of_the_wrong_shape_are_refused(tiny: TinyCache) -> None:
    t = tiny(NAME)
    llm = t.family.extract_llm(t.model)
    with pytest.raises(ValueError, match=r"merged grid \[1, rows, columns, hidden\]"):
        t.family.llm_prefix(llm, t.processor, t.features[0].flatten(1, 2), t.prompt)


def test_the_tiny_folder_is_what_trtllm_serve_takes(tiny: TinyCache) -> None:
    """Its chat template writes the family's prompt (images before the text) after ``<s>``, and the folder passes
    trtllm-serve's checks (the release's matrix lists Mistral3ForConditionalGeneration)."""
    from vlmforge.deploy import trtllm_serve as ts

    t = tiny(NAME)
    messages = [{"role": "user", "content": [{"type": "text", "text": "Compare them."}, {"type": "image"},
                                             {"type": "image"}]}]
    chat = t.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert chat == t.processor.tokenizer.bos_token + t.family.format_prompt("Compare them.", 2)
    facts = ts.check_checkpoint(t.model_dir, ts.ServeLimits(max_batch_size=1, max_seq_len=128))
    assert facts.architecture == "Mistral3ForConditionalGeneration"



MISTRAL_SMALL_CONFIG = {  # Mistral-Small-3.1-24B-Instruct-2503's config.json, trimmed (read from a verbatim copy)
    "architectures": ["Mistral3ForConditionalGeneration"], "model_type": "mistral3", "image_token_index": 10,
    "spatial_merge_size": 2, "vision_feature_layer": -1, "multimodal_projector_bias": False,
    "text_config": {"model_type": "mistral", "hidden_size": 5120, "num_attention_heads": 32, "head_dim": 128},
    "vision_config": {"model_type": "pixtral", "image_size": 1540, "patch_size": 14, "head_dim": 64},
}


def test_architecture_facts_and_checkpoint_check_of_the_real_config() -> None:
    """3025 = (1540 / 28)^2 [IMG] tokens and 32 heads, as the catalog derives; a Pixtral-12B-like config (16-pixel
    patches, no merge) is refused before any work: the budgets were counted for 14 and 2."""
    from vlmforge.errors import SpecError
    from vlmforge.families import get_family, resolve
    from vlmforge.families.base import ArchitectureFacts
    from vlmforge.specs.catalog import catalog_specs

    family = get_family("mistral3")
    spec = next(s for s in catalog_specs() if s.name == "Mistral-Small-3.1-24B-Instruct-2503")
    derived = resolve(spec).derived
    assert family.architecture_facts(MISTRAL_SMALL_CONFIG) == ArchitectureFacts(derived.num_visual_features, 32) \
        == ArchitectureFacts(3025, spec.architecture.num_attention_heads)
    family.check_checkpoint_config(spec, MISTRAL_SMALL_CONFIG)
    with pytest.raises(SpecError, match="patch_size 16 and spatial_merge_size 1; vlmforge counts mistral3 tokens for "
                                        "14 and 2") as info:
        family.check_checkpoint_config(spec, {**MISTRAL_SMALL_CONFIG, "spatial_merge_size": 1,
                                              "vision_config": {"patch_size": 16, "image_size": 1024}})
    assert info.value.path == "source"


def test_transformers_own_processor_loads_the_folder_and_agrees(tiny: TinyCache) -> None:
    """Where transformers' PixtralProcessor imports (4.57, NVIDIA's 1.2 image; 5 needs torchvision), AutoProcessor
    loads the tiny folder as PixtralProcessor and gives the family processor's ids and pixels."""
    try:
        from transformers.models.pixtral.processing_pixtral import PixtralProcessor
    except ImportError as exc:
        pytest.skip(f"transformers' PixtralProcessor does not import here: {exc}")
    from transformers import AutoProcessor

    t = tiny(NAME)
    theirs = AutoProcessor.from_pretrained(t.model_dir)
    assert isinstance(theirs, PixtralProcessor) and (theirs.patch_size, theirs.spatial_merge_size) == (4, 2)
    text = t.family.format_prompt(PROMPT, 2)
    want = theirs(images=t.images[1:], text=text, return_tensors="pt")
    got = t.processor(images=t.images[1:], text=text)
    assert want["input_ids"].tolist() == got["input_ids"].tolist()
    assert want["image_sizes"].tolist() == got["image_sizes"].tolist()
    assert (want["pixel_values"] - got["pixel_values"]).abs().max().item() < 1e-6
