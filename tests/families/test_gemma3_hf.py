"""Gemma3 on the hf toolchain, with tiny://gemma3: the prefix transformers' Gemma3Model builds (text embeddings scaled
by sqrt(hidden), image rows spliced in unscaled, token_type_ids on the image tokens), the LLM alone against the full
model's logits with the image tokens attended bidirectionally (a causal prefill is caught), batched prefills equal to
lone ones, and the TensorRT-LLM engine path and the static decode path refused with their reasons."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
import torch

from tests.helpers.tiny import MAX_NEW_TOKENS, TinyCache
from vlmforge.errors import PlanError
from vlmforge.modeling.generation import greedy_prefix
from vlmforge.specs.catalog import catalog_entry
from vlmforge.specs.schema import Dialect, spec_from_dict
from vlmforge.toolchains.trtllm.plan import build_plan

NAME = "gemma3"
LOGIT_TOL = 1e-4
VALIDATION_ERROR = 0.05
"""tiny-gemma3's max_logit_error: what a build's validation allows."""


def llm_of(t: Any) -> Any:
    return t.family.extract_llm(t.model)


def test_the_prefix_is_what_gemma3_model_builds(tiny: TinyCache) -> None:
    t = tiny(NAME)
    llm = llm_of(t)
    inputs = t.processor(images=[t.images[0]], text=t.prompt, return_tensors="pt")
    prefix = t.family.llm_prefix(llm, t.processor, t.features[0], t.prompt)
    assert prefix.token_type_ids is not None
    assert torch.equal(prefix.token_type_ids, inputs["token_type_ids"])
    assert int(prefix.token_type_ids.sum()) == 16 and prefix.length == inputs["input_ids"].shape[1]
    ids, image = inputs["input_ids"], inputs["token_type_ids"].bool()
    with torch.no_grad():
        features = t.model.model.get_image_features(inputs["pixel_values"], return_dict=True).pooler_output
        want = t.model.model.get_input_embeddings()(ids).masked_scatter(image[..., None], features)
    assert torch.allclose(prefix.embeds, want, atol=1e-6)
    # the image rows are the projector's, unscaled; the text rows the embedding table's times sqrt(hidden)
    assert torch.allclose(prefix.embeds[image], t.features[0][0], atol=1e-6)
    scale = math.sqrt(t.model.config.text_config.hidden_size)
    table = t.model.model.language_model.embed_tokens.weight
    assert torch.allclose(prefix.embeds[~image], table[ids[~image]] * scale, atol=1e-5)


def test_the_llm_alone_gives_the_reference_logits_only_with_bidirectional_image_tokens(tiny: TinyCache) -> None:
    """The pitfall: Gemma3's image tokens attend to each other both ways in the prefill. The LLM alone, fed the prefix
    (its token_type_ids), matches Gemma3ForConditionalGeneration's generate; the same prefix attended causally is off
    by more than the validation allows on every golden image."""
    t = tiny(NAME)
    llm = llm_of(t)
    for features, ref in zip(t.features, t.refs, strict=True):
        got = t.family.generate(llm, t.processor, features, t.prompt, MAX_NEW_TOKENS)
        assert got.tokens == ref.tokens
        assert float((got.logits - ref.logits).abs().max()) < LOGIT_TOL
        causal = dataclasses.replace(t.family.llm_prefix(llm, t.processor, features, t.prompt), token_type_ids=None)
        first = greedy_prefix(llm, causal, 1).logits[0]
        assert float((first - ref.logits[0]).abs().max()) > VALIDATION_ERROR


def test_two_images_in_one_prompt_are_two_blocks_as_in_transformers(tiny: TinyCache) -> None:
    t = tiny(NAME)
    llm = llm_of(t)
    prompt = "Compare them."
    ref = t.family.reference_generate(t.model, t.processor, t.images[:2], prompt, MAX_NEW_TOKENS)
    got = t.family.generate(llm, t.processor, t.features[:2], prompt, MAX_NEW_TOKENS)
    assert got.tokens == ref.tokens
    assert float((got.logits - ref.logits).abs().max()) < LOGIT_TOL
    prefix = t.family.llm_prefix(llm, t.processor, t.features[:2], prompt)
    types = prefix.token_type_ids[0].tolist()
    runs = sum(1 for i, v in enumerate(types) if v and (i == 0 or not types[i - 1]))
    assert runs == 2 and sum(types) == 32
    with pytest.raises(ValueError, match="16 tokens each"):
        t.family.prompt_length(t.processor, prompt, [16, 12])


def test_a_batched_prefill_gives_each_request_its_lone_logits(tiny: TinyCache) -> None:
    """Left-padded rows of different lengths (one and two images) keep their own bidirectional blocks and sliding
    windows; the sliding-window cache takes no in-flight joins (requests wait for the next batch instead)."""
    from vlmforge.runner.states import make_batch

    t = tiny(NAME)
    llm = llm_of(t)
    requests = [(t.features[0], t.prompt), (t.features[:2], "Compare them."), (t.features[2], "Hi"),
                (t.features[1], None)]
    prefixes = [t.family.llm_prefix(llm, t.processor, features, prompt) for features, prompt in requests]
    assert len({p.length for p in prefixes}) == len(prefixes)
    alone = [greedy_prefix(llm, prefix, 4) for prefix in prefixes]
    batch = make_batch(llm, prefixes)
    with torch.no_grad():
        logits = batch.prefill()
        for step in range(4):
            for row, lone in enumerate(alone):
                assert float((logits[row].float() - lone.logits[step]).abs().max()) < LOGIT_TOL, (row, step)
            if step < 3:
                logits = batch.step(torch.tensor([lone.tokens[step] for lone in alone]))
        assert batch.room(prefixes[0].length, 4) is None


def test_the_static_decode_path_refuses_bidirectional_prefixes(tiny: TinyCache) -> None:
    from vlmforge.runner.static import StaticDecoder

    t = tiny(NAME)
    llm = llm_of(t)
    prefix = t.family.llm_prefix(llm, t.processor, t.features[0], t.prompt)
    decoder = StaticDecoder(llm, max_batch_size=2, max_length=128, length_multiple=64, compile=False, graphs=False)
    with pytest.raises(ValueError, match="no bidirectional prefill mask.*--decode dynamic"):
        decoder.batch([prefix], 4)


@pytest.mark.parametrize("model", ["gemma-3-4b-it", "tiny-gemma3"])
@pytest.mark.parametrize("dialect", list(Dialect))
def test_tensorrt_llm_engine_plans_are_refused_with_the_reason(model: str, dialect: Dialect) -> None:
    spec = spec_from_dict(catalog_entry(model))
    with pytest.raises(PlanError, match="engine builder has no Gemma3 multimodal support.*--backend trtllm-serve"):
        build_plan(spec, dialect=dialect)


def test_the_catalog_models_are_gemma3s_real_settings() -> None:
    from vlmforge.families import resolve

    for model, heads in (("gemma-3-4b-it", 8), ("gemma-3-12b-it", 16), ("gemma-3-27b-it", 32)):
        resolved = resolve(spec_from_dict(catalog_entry(model)))
        assert resolved.spec.dtype.value == "bfloat16"
        assert resolved.derived.num_visual_features == 256
        assert resolved.spec.architecture.num_attention_heads == heads
    facts = resolved.family.architecture_facts({"mm_tokens_per_image": 256, "text_config": {"num_attention_heads": 32},
                                                "vision_config": {"image_size": 896, "patch_size": 14}})
    assert (facts.num_visual_features, facts.num_attention_heads) == (256, 32)


def test_the_tiny_model_is_a_folder_trtllm_serve_takes(tiny: TinyCache) -> None:
    """trtllm-serve takes images through the chat API only: the tiny model's chat template writes format_prompt's
    turn (after the tokenizer's bos), and the folder passes the trtllm-serve backend's checkpoint check."""
    from vlmforge.deploy import trtllm_serve as ts

    t = tiny(NAME)
    messages = [{"role": "user", "content": [{"type": "text", "text": "Compare them."}, {"type": "image"},
                                             {"type": "image"}]}]
    chat = t.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert chat == t.processor.tokenizer.bos_token + t.family.format_prompt("Compare them.", 2)
    facts = ts.check_checkpoint(t.model_dir, ts.ServeLimits(max_batch_size=1, max_seq_len=128))
    assert facts.architecture == "Gemma3ForConditionalGeneration"
