"""mllama on the hf toolchain (tiny://mllama): the three-input visual engine (tiles, aspect-ratio ids and mask) against
transformers' vision model and projector, in torch and in ONNX Runtime at other batch sizes than it was exported at;
the host's aspect-ratio inputs and the states' visibility against the processor's; the masks the LLM builds against
``MllamaModel``'s own; the split path against ``generate`` on images of 4, 3 and 3 tiles, one or several per prompt;
and the eager batch state (right-padded states, left-padded rows, one- and two-image rows) against each request alone,
with joins and the static path refused."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.tiny import MAX_NEW_TOKENS, TinyCache
from vlmforge.modeling.generation import LlmPrefix, greedy_prefix
from vlmforge.runner.batching import greedy_batch
from vlmforge.runner.states import make_batch

NAME = "mllama"
PROMPT = "<|image|><|begin_of_text|>What is this?"


def test_golden_images_give_three_tile_grids(tiny: TinyCache) -> None:
    t = tiny(NAME)
    processed = [t.processor.image_processor(images=[[image]], return_tensors="pt") for image in t.images]
    assert [int(p["aspect_ratio_mask"].sum()) for p in processed] == [4, 3, 3]
    assert [tuple(f.shape) for f in t.features] == [(1, 20, 64), (1, 15, 64), (1, 15, 64)]


def test_host_aspect_inputs_equal_the_image_processor(tiny: TinyCache) -> None:
    from PIL import Image

    from vlmforge.families.mllama_hf import aspect_inputs

    t = tiny(NAME)
    sizes = [(h, w) for h in (10, 28, 40, 57, 90, 300) for w in (9, 30, 56, 91, 250)]
    for height, width in sizes:
        ref = t.processor.image_processor(images=[[Image.new("RGB", (width, height))]], return_tensors="pt")
        ids, mask = aspect_inputs([(height, width)], 4, 28)
        assert torch.equal(ids, ref["aspect_ratio_ids"]), (height, width)
        assert torch.equal(mask, ref["aspect_ratio_mask"]), (height, width)


def test_visual_module_equals_transformers_vision_model_and_projector(tiny: TinyCache) -> None:
    t = tiny(NAME)
    processed = t.processor(images=[[image] for image in t.images], text=[PROMPT] * 3, return_tensors="pt")
    with torch.no_grad():
        vision = t.model.model.vision_model(pixel_values=processed["pixel_values"],
                                            aspect_ratio_ids=processed["aspect_ratio_ids"],
                                            aspect_ratio_mask=processed["aspect_ratio_mask"]).last_hidden_state
        ref = t.model.model.multi_modal_projector(vision)
        got = t.family.visual_outputs(t.family.visual_module(t.model), t.family.visual_inputs(t.processor, t.images))
    assert got.shape == ref.shape == (3, 1, 4, 5, 64)
    assert (got - ref).abs().max().item() < 1e-5


def test_onnx_engine_matches_torch_at_every_batch(tiny: TinyCache) -> None:
    """Exported on all three images, run by ONNX Runtime on each alone and on two: the batch axis is dynamic, the
    error about 1e-6 (float32), and the LLM fed the ONNX features generates the reference's tokens."""
    from vlmforge.toolchains.hf.onnx import compare_onnx_feed, run_onnx_feed

    t = tiny(NAME)
    family, module = t.family, t.family.visual_module(t.model)
    info = t.onnx()
    inputs = family.visual_inputs(t.processor, t.images)
    feeds = [family.visual_engine_feeds(inputs.select(pick), 8, {})[0] for pick in ([0], [1], [2], [2, 0])]
    for feed in feeds:
        report = compare_onnx_feed(info.path, module, feed)
        assert report["max_abs"] < 1e-5 and report["max_rel_to_scale"] < 1e-5, report
    outputs = torch.cat([run_onnx_feed(info.path, feed) for feed in feeds[:3]])
    features = [family.pack_visual_features(t.processor, part, size, {})
                for part, size in zip(inputs.split_outputs(outputs), inputs.image_sizes, strict=True)]
    llm = family.extract_llm(t.model)
    assert [family.generate(llm, t.processor, f, t.prompt, MAX_NEW_TOKENS).tokens for f in features] == \
        [r.tokens for r in t.refs]


def test_visibility_and_masks_equal_the_processor_and_mllama_model(tiny: TinyCache) -> None:
    """The prefix's visibility is the processor's cross_attention_mask repeated per patch (real tiles only); the LLM
    turns it into MllamaModel's additive mask and full-text-row mask."""
    from transformers.models.mllama.modeling_mllama import _prepare_cross_attention_mask

    t = tiny(NAME)
    llm = t.family.extract_llm(t.model)
    processed = t.processor(images=[t.images[1]], text=PROMPT, return_tensors="pt")
    prefix = t.family.llm_prefix(llm, t.processor, t.features[1], PROMPT)
    assert prefix.cross_mask is not None and prefix.cross_states is not None
    dense = processed["cross_attention_mask"]  # [1, L, 1, 4]
    assert torch.equal(prefix.cross_mask, dense[:, :, 0, :3].repeat_interleave(5, dim=-1))
    assert prefix.length == processed["input_ids"].shape[1] == t.family.prompt_length(t.processor, PROMPT, 20)
    want, want_rows = _prepare_cross_attention_mask(dense, num_vision_tokens=5, dtype=torch.float32)
    seen = {}

    def spy(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        seen.update(mask=kwargs["cross_attention_mask"], rows=kwargs["full_text_row_masked_out_mask"])

    handle = llm.model.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        with torch.no_grad():
            llm(inputs_embeds=prefix.embeds, **prefix.prefill_kwargs())
    finally:
        handle.remove()
    assert torch.equal(seen["mask"], want[..., :15]) and torch.equal(seen["rows"], want_rows)
    assert int(want_rows.sum()) == prefix.length  # from the image token on, every position sees the image


def test_a_prompt_for_another_image_count_is_refused(tiny: TinyCache) -> None:
    t = tiny(NAME)
    with pytest.raises(ValueError, match="exactly one <\\|image\\|>"):
        t.family.prompt_length(t.processor, "<|image|><|image|><|begin_of_text|>Two?", 20)
    with pytest.raises(ValueError, match="an mllama prompt for 2 images holds exactly 2 <\\|image\\|>"):
        t.family.llm_prefix(t.family.extract_llm(t.model), t.processor, t.features[:2], "A<|image|>B")


# --- several images per prompt (hf toolchain): each image's states, each visible from its own <|image|> on ----------

MULTI_PROMPTS = ["<|image|><|image|><|begin_of_text|>Compare the two pictures",
                 "<|image|><|begin_of_text|>First this<|image|> and then that"]


@pytest.mark.parametrize("order", [(0, 1), (2, 0), (1, 2, 0)], ids=str)
@pytest.mark.parametrize("which", [0, 1])
def test_several_images_of_different_sizes_equal_transformers_generate(tiny: TinyCache, order: tuple[int, ...],
                                                                        which: int) -> None:
    """Images of 4, 3 and 3 tiles in one prompt (together, or each before its own text): the same greedy tokens as
    transformers' generate() on the processor's nested images (float32), logits within 1e-4; the states' visibility
    is the processor's cross_attention_mask over the real tiles."""
    t = tiny(NAME)
    llm = t.family.extract_llm(t.model)
    images = [t.images[i] for i in order]
    prompt = MULTI_PROMPTS[which].replace("<|image|><|image|>", "<|image|>" * len(order)) if which == 0 else \
        MULTI_PROMPTS[which] + "<|image|> last" * (len(order) - 2)
    ref = t.family.reference_generate(t.model, t.processor, images, prompt, MAX_NEW_TOKENS)
    features = [t.features[i] for i in order]
    got = t.family.generate(llm, t.processor, features, prompt, MAX_NEW_TOKENS)
    assert got.tokens == ref.tokens and (got.logits - ref.logits).abs().max().item() < 1e-4
    processed = t.processor(images=[images], text=prompt, return_tensors="pt")
    prefix = t.family.llm_prefix(llm, t.processor, features, prompt)
    tiles = [int(f.shape[1]) // 5 for f in features]
    dense = processed["cross_attention_mask"]
    want = torch.cat([dense[:, :, i, :n] for i, n in enumerate(tiles)], dim=-1).repeat_interleave(5, dim=-1)
    assert torch.equal(prefix.cross_mask, want) and prefix.cross_states.shape[1] == sum(f.shape[1] for f in features)
    assert prefix.length == t.family.prompt_length(t.processor, prompt, [20] * len(order))


def test_prompts_get_one_image_token_per_image() -> None:
    from vlmforge.families import get_family

    family = get_family("mllama")
    golden = family.golden_prompt
    assert family.format_prompt(golden, 2) == "<|image|>" + golden  # the README form for one image: one per image
    assert family.format_prompt("<|image|><|image|>Two?", 1) == "<|image|><|image|>Two?"  # refused later, not fixed
    assert family.format_prompt("Hi", 2) == "<|image|><|image|><|begin_of_text|>Hi"
    assert family.format_prompt(MULTI_PROMPTS[1], 2) == MULTI_PROMPTS[1]  # placed by the user: kept
    assert family.images_per_prompt_limit is None


def test_a_batch_of_one_and_two_image_prompts_decodes_as_each_alone(tiny: TinyCache) -> None:
    t = tiny(NAME)
    llm = t.family.extract_llm(t.model)
    requests = [([0], t.prompt), ([1, 2], MULTI_PROMPTS[0]), ([2], "<|image|><|begin_of_text|>What is this?"),
                ([2, 0], MULTI_PROMPTS[1]), ([1], t.prompt)]
    prefixes = [t.family.llm_prefix(llm, t.processor, [t.features[i] for i in images], text)
                for images, text in requests]
    assert len({int(p.cross_states.shape[1]) for p in prefixes}) > 2
    alone = [greedy_prefix(llm, p, MAX_NEW_TOKENS) for p in prefixes]
    for one, many in zip(alone, greedy_batch(llm, prefixes, MAX_NEW_TOKENS), strict=True):
        assert many.tokens == one.tokens
        assert (many.logits - one.logits).abs().max().item() < 1e-4


def test_the_states_matter(tiny: TinyCache) -> None:
    """Without its cross-attention states the same prompt decodes otherwise (the cross-attention layer is used)."""
    t = tiny(NAME)
    llm = t.family.extract_llm(t.model)
    prefix = t.family.llm_prefix(llm, t.processor, t.features[0], t.prompt)
    plain = LlmPrefix(prefix.kind, prefix.embeds, prefix.mask, prefix.eos)
    with_states, without = (greedy_prefix(llm, p, MAX_NEW_TOKENS) for p in (prefix, plain))
    assert with_states.tokens == t.refs[0].tokens
    assert (with_states.logits[0] - without.logits[0]).abs().max().item() > 0.1


def _prefixes(t, llm) -> list[LlmPrefix]:
    requests = [(0, t.prompt), (1, PROMPT), (2, "<|image|><|begin_of_text|>Describe the picture in a few words"),
                (0, "A<|image|><|begin_of_text|>B"), (1, t.prompt)]
    return [t.family.llm_prefix(llm, t.processor, t.features[i], prompt) for i, prompt in requests]


def test_batched_rows_decode_as_alone(tiny: TinyCache) -> None:
    """Rows of several lengths (left padding) and 20 or 15 states (right-padded states, masked), one text before its
    image (a row that sees no state): each decodes as alone."""
    t = tiny(NAME)
    llm = t.family.extract_llm(t.model)
    prefixes = _prefixes(t, llm)
    assert len({p.length for p in prefixes}) > 2 and len({int(p.cross_states.shape[1]) for p in prefixes}) == 2
    alone = [greedy_prefix(llm, p, MAX_NEW_TOKENS) for p in prefixes]
    batched = greedy_batch(llm, prefixes, MAX_NEW_TOKENS)
    for one, many in zip(alone, batched, strict=True):
        assert many.tokens == one.tokens
        assert (many.logits - one.logits).abs().max().item() < 1e-4


def test_rows_that_end_early_leave_the_others_as_alone(tiny: TinyCache) -> None:
    """The longest prompt ends first (its own token limit): the others' left padding is then needed by no live row,
    and the batch must not trim its cache's columns, whose cross-attention layers hold states, not positions."""
    t = tiny(NAME)
    llm = t.family.extract_llm(t.model)
    prefixes = _prefixes(t, llm)
    longest = max(range(len(prefixes)), key=lambda i: prefixes[i].length)
    limits = [2 if i == longest else MAX_NEW_TOKENS - i for i in range(len(prefixes))]
    alone = [greedy_prefix(llm, p, n) for p, n in zip(prefixes, limits, strict=True)]
    batched = greedy_batch(llm, prefixes, limits)
    for one, many in zip(alone, batched, strict=True):
        assert many.tokens == one.tokens
        assert (many.logits - one.logits).abs().max().item() < 1e-4


def test_the_padded_states_are_masked(tiny: TinyCache, monkeypatch: pytest.MonkeyPatch) -> None:
    """A row of 15 states beside one of 20: seeing its 5 zero-padded states would change its logits."""
    import vlmforge.runner.states as states

    t = tiny(NAME)
    llm = t.family.extract_llm(t.model)
    prefixes = [t.family.llm_prefix(llm, t.processor, t.features[i], t.prompt) for i in (0, 1)]
    alone = greedy_prefix(llm, prefixes[1], 1)
    real = states._cross_inputs

    def leaky(prefixes, mask):  # noqa: ANN001, ANN202 - the padded states made visible
        extra = real(prefixes, mask)
        extra["cross_attention_mask"][1, -1, 15:] = 1
        return extra

    monkeypatch.setattr(states, "_cross_inputs", leaky)
    batch = make_batch(llm, prefixes)
    logits = batch.prefill()
    assert (logits[1].float() - alone.logits[0]).abs().max().item() > 1e-3


def test_joins_wait_for_the_batch_boundary_and_the_static_path_refuses(tiny: TinyCache) -> None:
    from vlmforge.runner.static import StaticDecoder

    t = tiny(NAME)
    llm = t.family.extract_llm(t.model)
    prefixes = _prefixes(t, llm)
    batch = make_batch(llm, prefixes[:2])
    batch.prefill()
    assert batch.room(prefixes[2].length, 4) is None
    decoder = StaticDecoder(llm, max_batch_size=2, length_multiple=32, compile=False, graphs=False)
    with pytest.raises(ValueError, match="no cross-attention states"):
        decoder.batch(prefixes[:1], 4)
