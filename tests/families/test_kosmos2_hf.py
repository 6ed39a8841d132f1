"""kosmos2 on the hf toolchain (tiny://kosmos-2): the visual module against transformers' ``get_image_features``, the
prompt's ids and ``image_embeds_position_mask`` against Kosmos2Processor's, the split path (the text decoder fed
inputs_embeds) against the float32 ``generate``, and the padding-offset sinusoidal positions: the runner's 0-based
position ids are shifted onto the table's rows, so a left-padded batch decodes as each request alone (transformers'
own class, fed the same ids raw, does not)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.tiny import MAX_NEW_TOKENS, TinyCache
from vlmforge.modeling.generation import greedy_prefix
from vlmforge.runner.batching import greedy_batch

NAME = "kosmos-2"
PROMPTS = [None, "<grounding>A photo of", "What is this?", "Question: which city is this? Answer:"]


def test_visual_module_equals_the_full_models_image_embeds(tiny: TinyCache) -> None:
    """What Kosmos2ForConditionalGeneration's forward computes as image_embeds (transformers 5 and 4.57)."""
    t = tiny(NAME)
    processed = t.processor(images=t.images, text=[t.prompt] * 3, return_tensors="pt")
    with torch.no_grad():
        ref = t.model(pixel_values=t.pixel_values, input_ids=processed["input_ids"],
                      attention_mask=processed["attention_mask"],
                      image_embeds_position_mask=processed["image_embeds_position_mask"]).image_embeds
        got = t.family.visual_module(t.model)(t.pixel_values)
    assert got.shape == ref.shape == (3, 64, 64)
    assert (got - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("prompt", PROMPTS)
def test_prompt_ids_and_image_positions_equal_the_processor(tiny: TinyCache, prompt: str | None) -> None:
    t = tiny(NAME)
    processed = t.processor(images=t.images[:1], text=t.family.format_prompt(prompt), return_tensors="pt")
    ids, where = t.family._prompt_ids(t.processor, prompt, 64)
    assert torch.equal(ids, processed["input_ids"])
    assert torch.equal(where.long(), processed["image_embeds_position_mask"].long())
    assert int(where.sum()) == 64 and t.family.prompt_length(t.processor, prompt, 64) == ids.shape[1]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_split_path_equals_transformers(tiny: TinyCache, prompt: str | None) -> None:
    t = tiny(NAME)
    family, llm = t.family, t.family.extract_llm(t.model)
    for image, features in zip(t.images, t.features, strict=True):
        ref = family.reference_generate(t.model, t.processor, image, prompt, MAX_NEW_TOKENS)
        got = family.generate(llm, t.processor, features, prompt, MAX_NEW_TOKENS)
        assert got.tokens == ref.tokens and (got.logits - ref.logits).abs().max().item() < 1e-4


def _prefixes(t: object, llm: object) -> list:
    requests = [(0, None), (1, "What is this?"), (2, "Question: which city is this? Answer:"), (0, "<grounding>A")]
    return [t.family.llm_prefix(llm, t.processor, t.features[i], prompt) for i, prompt in requests]  # type: ignore


def test_left_padded_batch_with_position_ids_decodes_as_alone(tiny: TinyCache) -> None:
    t = tiny(NAME)
    llm = t.family.extract_llm(t.model)
    prefixes = _prefixes(t, llm)
    assert len({p.length for p in prefixes}) > 2  # rows of several lengths: left padding, explicit positions
    alone = [greedy_prefix(llm, p, MAX_NEW_TOKENS) for p in prefixes]
    batched = greedy_batch(llm, prefixes, MAX_NEW_TOKENS)
    for one, many in zip(alone, batched, strict=True):
        assert many.tokens == one.tokens and (many.logits - one.logits).abs().max().item() < 1e-4


def test_the_padding_offset_is_what_makes_batches_right(tiny: TinyCache) -> None:
    """0-based position ids fed raw (transformers' class) hit the sinusoid table one row low: the logits move."""
    from transformers.models.kosmos2.modeling_kosmos2 import Kosmos2TextForCausalLM

    t = tiny(NAME)
    llm = t.family.extract_llm(t.model)
    prefix = t.family.llm_prefix(llm, t.processor, t.features[0], t.prompt)
    positions = torch.arange(prefix.length)[None]
    with torch.no_grad():
        own = llm(inputs_embeds=prefix.embeds, attention_mask=prefix.mask).logits
        shifted = llm(inputs_embeds=prefix.embeds, attention_mask=prefix.mask, position_ids=positions).logits
        raw = Kosmos2TextForCausalLM.forward(llm, inputs_embeds=prefix.embeds, attention_mask=prefix.mask,
                                             position_ids=positions).logits
    assert (own - shifted).abs().max().item() < 1e-5
    assert (own - raw).abs().max().item() > 1e-2
