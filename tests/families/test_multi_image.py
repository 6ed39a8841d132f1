"""Several images in one prompt on the hf toolchain's split path (vision encoder -> a prefix with every image's
features spliced in -> the LLM alone), against transformers' own model fed the same images: LLaVA takes any number,
the other families one."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.tiny import MAX_NEW_TOKENS, TINY_MODELS, TinyCache, family_of_tiny
from vlmforge.families import get_family
from vlmforge.families.tinykit import IMAGE_ID
from vlmforge.modeling.generation import compare_generations
from vlmforge.toolchains.hf.onnx import run_onnx

LOGIT_TOL = 1e-4
PROMPT = "Which of the two is brighter?"


def two_image_features(t, order=(0, 1)) -> list[torch.Tensor]:
    with torch.no_grad():
        features = t.family.visual_module(t.model)(t.family.pixel_values(t.processor, [t.images[i] for i in order]))
    return [features[i : i + 1] for i in range(len(order))]


def test_llava_formats_one_placeholder_per_image() -> None:
    llava = get_family("llava")
    assert llava.format_prompt("Hi?", 2) == "USER: <image>\n<image>\nHi? ASSISTANT:"
    assert llava.format_prompt("Hi?", 1) == llava.format_prompt("Hi?") == "USER: <image>\nHi? ASSISTANT:"
    assert llava.format_prompt(llava.format_prompt("Hi?", 3), 3) == "USER: <image>\n<image>\n<image>\nHi? ASSISTANT:"


def test_llava_two_images_split_path_equals_transformers(tiny: TinyCache) -> None:
    """LlavaForConditionalGeneration fed both images by its processor vs vision encoder -> llm_prefix with both
    images' features -> the LLM alone: the same tokens, logits within 1e-4."""
    t = tiny("llava")
    family, llm = t.family, t.family.extract_llm(t.model)
    images = [t.images[0], t.images[1]]
    ref = family.reference_generate(t.model, t.processor, images, PROMPT, MAX_NEW_TOKENS)
    features = two_image_features(t)
    got = family.generate(llm, t.processor, features, PROMPT, MAX_NEW_TOKENS)
    assert got.tokens == ref.tokens and len(ref.tokens) >= 2
    assert (got.logits - ref.logits).abs().max().item() < LOGIT_TOL

    # the prefix holds the text and both images' rows, in order; prompt_length knows it from the tokenizer alone
    n = features[0].shape[1]
    prefix = family.llm_prefix(llm, t.processor, features, PROMPT)
    ids = t.processor(images=images, text=family.format_prompt(PROMPT, 2), return_tensors="pt").input_ids
    assert int((ids == IMAGE_ID).sum()) == 2 * n
    assert prefix.length == ids.shape[1] == family.prompt_length(t.processor, PROMPT, [n, n])
    image_rows = (ids[0] == IMAGE_ID).nonzero().flatten()
    assert torch.equal(prefix.embeds[0, image_rows], torch.cat(features, dim=1)[0])

    # the ONNX visual engine's features of both images give the same tokens
    onnx = run_onnx(t.onnx().path, family.pixel_values(t.processor, images))
    assert family.generate(llm, t.processor, [onnx[0:1], onnx[1:2]], PROMPT, MAX_NEW_TOKENS).tokens == ref.tokens


def test_llava_each_image_counts_in_its_place(tiny: TinyCache) -> None:
    """Swapping the two images, or dropping the second, changes the output: neither image is ignored."""
    t = tiny("llava")
    family, llm = t.family, t.family.extract_llm(t.model)
    ref = family.generate(llm, t.processor, two_image_features(t), PROMPT, MAX_NEW_TOKENS)
    swapped = family.generate(llm, t.processor, two_image_features(t, (1, 0)), PROMPT, MAX_NEW_TOKENS)
    alone = family.generate(llm, t.processor, two_image_features(t, (0,)), PROMPT, MAX_NEW_TOKENS)
    for other in (swapped, alone):
        assert compare_generations(ref, other).first_step_logit_error > 0.1
    # the reference agrees on the swap too
    ref_swapped = family.reference_generate(t.model, t.processor, [t.images[1], t.images[0]], PROMPT, MAX_NEW_TOKENS)
    assert ref_swapped.tokens == swapped.tokens


def test_llava_placeholders_in_the_users_text(tiny: TinyCache) -> None:
    """A prompt that places its own <image> tokens keeps them where they are, one per image."""
    t = tiny("llava")
    family, llm = t.family, t.family.extract_llm(t.model)
    prompt = "USER: left <image>\nand right <image>\nwhich is brighter? ASSISTANT:"
    ref = family.reference_generate(t.model, t.processor, [t.images[0], t.images[2]], prompt, MAX_NEW_TOKENS)
    got = family.generate(llm, t.processor, two_image_features(t, (0, 2)), prompt, MAX_NEW_TOKENS)
    assert got.tokens == ref.tokens and (got.logits - ref.logits).abs().max().item() < LOGIT_TOL
    with pytest.raises(ValueError, match="a LLaVA prompt for 2 images holds exactly 2 <image>, one per image"):
        family.llm_prefix(llm, t.processor, two_image_features(t), "USER: <image>\nHi? ASSISTANT:")
    with pytest.raises(ValueError, match="exactly one <image>"):
        family.prompt_length(t.processor, prompt, 16)


@pytest.mark.parametrize("name", [n for n in TINY_MODELS if family_of_tiny(n).images_per_prompt_limit == 1])
def test_one_image_families_refuse_two(name: str, tiny: TinyCache) -> None:
    t = tiny(name)
    family = t.family
    features = [t.features[0], t.features[1]]
    with pytest.raises(ValueError, match=rf"{family.name} takes one image per prompt, at least one; got 2"):
        family.llm_prefix(family.extract_llm(t.model), t.processor, features, t.prompt)
    with pytest.raises(ValueError, match="takes one image per prompt"):
        family.prompt_length(t.processor, t.prompt, [4, 4])
    with pytest.raises(ValueError, match="takes one image per prompt"):
        family.reference_generate(t.model, t.processor, t.images[:2], t.prompt, 2)
    # one image as a one-element list is the same request as the tensor
    llm = family.extract_llm(t.model)
    assert family.generate(llm, t.processor, [t.features[0]], t.prompt, 4).tokens == t.refs[0].tokens[:4]
