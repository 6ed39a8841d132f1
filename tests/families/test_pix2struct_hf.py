"""pix2struct on the hf toolchain (tiny://pix2struct): the two-input visual engine (flattened patches and their mask)
against transformers' own encoder, in torch and in ONNX Runtime at other patch counts and batches than it was
exported at; each image's real patches counted as the processor counts them; padded rows without weight; the
checkpoint facts (max_patches beside config.json). VQA checkpoints (tiny://pix2struct-vqa): the header rendered as
transformers' processor renders it, the header font's journey from checkpoint to engine."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from tests.helpers.tiny import MAX_NEW_TOKENS, TinyCache
from vlmforge.errors import SourceError, SpecError
from vlmforge.families import get_family
from vlmforge.families.pix2struct import patch_grid, read_max_patches

NAME = "pix2struct"


def test_golden_images_give_three_patch_counts(tiny: TinyCache) -> None:
    t = tiny(NAME)
    inputs = t.family.visual_inputs(t.processor, t.images)
    assert tuple(inputs.pixels.shape) == (3, 64, 2 + 4 * 4 * 3) and inputs.inputs_per_image == [1, 1, 1]
    assert [tuple(f.shape) for f in t.features] == [(1, 64, 32), (1, 55, 32), (1, 55, 32)]


def test_visual_features_equal_the_transformers_encoder(tiny: TinyCache) -> None:
    """The engine's path (all images in one call, padded, then each image's real rows) gives transformers' encoder
    states of the processor's own patches and mask, to 1e-5."""
    t = tiny(NAME)
    processed = t.processor.image_processor(images=t.images, max_patches=64, return_tensors="pt")
    with torch.no_grad():
        ref = t.model.encoder(flattened_patches=processed["flattened_patches"],
                              attention_mask=processed["attention_mask"]).last_hidden_state
    for index, features in enumerate(t.features):
        real = int(processed["attention_mask"][index].sum())
        assert features.shape[1] == real
        assert (features[0] - ref[index, :real]).abs().max().item() < 1e-5


@pytest.mark.parametrize(("patch", "max_patches"), [(4, 64), (16, 2048)])
def test_patch_grid_equals_the_processors_count(patch: int, max_patches: int) -> None:
    """patch_grid (what packing cuts each image's states to) against the processor's mask, 30 random sizes, at the
    tiny model's settings and DePlot's (16-pixel patches, 2048)."""
    from PIL import Image

    from vlmforge.families.tinykit import pil_image_processor

    processor = pil_image_processor("Pix2StructImageProcessor", patch_size={"height": patch, "width": patch},
                                    max_patches=max_patches, is_vqa=False)
    rng = random.Random(0)
    for _ in range(30):
        width, height = rng.randint(8, 900), rng.randint(8, 900)
        out = processor(images=[Image.new("RGB", (width, height))], max_patches=max_patches, return_tensors="pt")
        rows, cols = patch_grid(height, width, patch, patch, max_patches)
        assert int(out["attention_mask"].sum()) == rows * cols <= max_patches, (width, height)


def test_padding_has_no_weight_and_the_mask_matters(tiny: TinyCache) -> None:
    """An image's real rows give the same states with or without the padded rows after them; without the mask the
    padding is attended to and the states change."""
    t = tiny(NAME)
    module = t.family.visual_module(t.model)
    feed = t.family.visual_engine_feeds(t.family.visual_inputs(t.processor, t.images[1:2]), 1, {})[0]
    with torch.no_grad():
        padded = module(*feed.values())[:, :55]
        cut = module(feed["flattened_patches"][:, :55], feed["attention_mask"][:, :55])
        unmasked = module(feed["flattened_patches"], torch.ones_like(feed["attention_mask"]))[:, :55]
    assert int(feed["attention_mask"].sum()) == 55
    assert (padded - cut).abs().max().item() < 1e-5
    assert (unmasked - cut).abs().max().item() > 1e-3


def test_onnx_engine_matches_torch_at_other_patch_counts_and_batches(tiny: TinyCache) -> None:
    """Exported on the three images (64 patches each), run by ONNX Runtime on each alone, on two, and on feeds cut to
    55 and 20 patches: both axes are dynamic; the decoder fed the ONNX features generates the reference's tokens."""
    from vlmforge.toolchains.hf.onnx import compare_onnx_feed, run_onnx_feed

    t = tiny(NAME)
    family, module = t.family, t.family.visual_module(t.model)
    info = t.onnx()
    inputs = family.visual_inputs(t.processor, t.images)
    feeds = [family.visual_engine_feeds(inputs.select(pick), 8, {})[0] for pick in ([0], [1], [2], [2, 1])]
    cut = [{name: value[:, :length] for name, value in feeds[1].items()} for length in (55, 20)]
    for feed in feeds + cut:
        report = compare_onnx_feed(info.path, module, feed)
        assert report["max_rel_to_scale"] < 1e-5, report
    outputs = torch.cat([run_onnx_feed(info.path, feed) for feed in feeds[:3]])
    features = [family.pack_visual_features(t.processor, part, size, {})
                for part, size in zip(inputs.split_outputs(outputs), inputs.image_sizes, strict=True)]
    llm = family.extract_llm(t.model)
    assert [family.generate(llm, t.processor, f, None, MAX_NEW_TOKENS).tokens for f in features] == \
        [r.tokens for r in t.refs]


def test_the_decoder_saved_alone_reloads_with_its_start_and_end_tokens(tiny: TinyCache, tmp_path: Path) -> None:
    from vlmforge.families.tinykit import EOS_ID, PAD_ID

    t = tiny(NAME)
    t.family.extract_llm(t.model).save_pretrained(tmp_path)
    llm = t.family.llm_class().from_pretrained(tmp_path).eval()
    prefix = t.family.llm_prefix(llm, t.processor, t.features[1], None)
    assert (prefix.kind, prefix.start, prefix.eos, prefix.length) == ("cross", PAD_ID, frozenset({EOS_ID}), 55)
    assert t.family.generate(llm, t.processor, t.features[1], None, MAX_NEW_TOKENS).tokens == t.refs[1].tokens


def test_max_patches_is_read_beside_config_json(tmp_path: Path) -> None:
    family = get_family(NAME)
    with pytest.raises(SourceError, match="no max_patches in preprocessor_config.json or processor_config.json"):
        read_max_patches(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"max_patches": 2048, "is_vqa": False}))
    facts = family.checkpoint_facts(tmp_path, {"text_config": {"num_heads": 12}})
    assert (facts.num_visual_features, facts.num_attention_heads) == (2048, 12)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"max_patches": 1024, "is_vqa": True}))
    facts = family.checkpoint_facts(tmp_path, {"is_vqa": True, "text_config": {"num_heads": 12}})
    assert (facts.num_visual_features, facts.num_attention_heads) == (1024, 12)  # VQA: no longer refused
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(SourceError, match="preprocessor_config.json: unreadable"):
        read_max_patches(tmp_path)


def test_vqa_checkpoints_pass_the_hf_checkpoint_check() -> None:
    """DePlot (is_vqa: true) is no longer refused on the hf toolchain: its checkpoint check passes either way."""
    from vlmforge.specs.catalog import catalog_entry
    from vlmforge.specs.schema import spec_from_dict

    spec = spec_from_dict(catalog_entry("deplot"))
    get_family(NAME).check_checkpoint_config(spec, {"is_vqa": True})
    get_family(NAME).check_checkpoint_config(spec, {"is_vqa": False})


DEJAVU = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")


@pytest.mark.skipif(not DEJAVU.is_file(), reason="no local TrueType font to stand in for the hub's Arial.TTF")
def test_a_vqa_reference_renders_the_header_onto_the_image(tiny: TinyCache, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the trtllm toolchain validates DePlot against: the processor renders the header ("" for run.py's empty
    --input_text) above the image, so the patches change; the font the processor would fetch from the hub is a local
    one here."""
    import importlib

    class LocalFont:
        def hf_hub_download(self, *args: object) -> str:
            return str(DEJAVU)

    t = tiny(NAME)
    module = importlib.import_module(type(t.processor.image_processor).__module__)
    if hasattr(module, "hf_api"):  # transformers 5
        monkeypatch.setattr(module, "hf_api", lambda: LocalFont())
    else:  # transformers 4.57
        monkeypatch.setattr(module, "hf_hub_download", LocalFont().hf_hub_download)
    image_processor = t.processor.image_processor
    plain = t.family._patches(t.processor, t.images[:1])[0]
    monkeypatch.setattr(image_processor, "is_vqa", True)
    rendered = t.family._patches(t.processor, t.images[:1], ["Generate underlying data table of the figure below:"])[0]
    empty = t.family._patches(t.processor, t.images[:1])[0]
    assert plain.shape == rendered.shape == empty.shape
    assert not torch.equal(plain, rendered) and not torch.equal(rendered, empty)
    result = t.family.reference_generate(t.model, t.processor, t.images[0], "Generate", MAX_NEW_TOKENS)
    assert len(result.tokens) >= 1
