"""pix2struct on the hf toolchain (tiny://pix2struct): the two-input visual engine (flattened patches and their mask)
against transformers' own encoder, in torch and in ONNX Runtime at other patch counts and batches than it was
exported at; each image's real patches counted as the processor counts them; padded rows without weight; the
checkpoint facts (max_patches beside config.json). VQA checkpoints (tiny://pix2struct-vqa): the header rendered as
transformers' processor renders it, the header font's journey from checkpoint to engine."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers.tiny import MAX_NEW_TOKENS, TinyCache
from vlmforge.errors import SourceError
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


VQA = "pix2struct-vqa"
QUESTIONS = ("Generate underlying data table of the figure below:", "What is the highest value?")


def use_font_for_transformers(monkeypatch: pytest.MonkeyPatch, processor: Any, font: Path) -> None:
    """transformers' own rendering takes its font from the hub: here, the checkpoint's font file."""
    import importlib

    class LocalFont:
        def hf_hub_download(self, *args: object, **kwargs: object) -> str:
            return str(font)

    module = importlib.import_module(type(processor.image_processor).__module__)
    if hasattr(module, "hf_api"):  # transformers 5
        monkeypatch.setattr(module, "hf_api", lambda: LocalFont())
    else:  # transformers 4.57
        monkeypatch.setattr(module, "hf_hub_download", LocalFont().hf_hub_download)


def test_vqa_patches_equal_transformers_processors_for_each_question(tiny: TinyCache,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """tiny://pix2struct-vqa: the family's rendering (its own, with the checkpoint's font) gives exactly the patches
    Pix2StructProcessor(images, text=question) gives, and the processor gives the decoder no text for VQA; each
    question renders a different header (different patches), the sizes packing counts are the rendered images'."""
    from vlmforge.families.pix2struct import HEADER_FONT_FILE, extract_patches, header_font

    t = tiny(VQA)
    assert t.model.config.is_vqa and t.processor.image_processor.is_vqa
    assert header_font(t.processor) == str(t.model_dir / HEADER_FONT_FILE)
    use_font_for_transformers(monkeypatch, t.processor, t.model_dir / HEADER_FONT_FILE)
    seen = []
    for question in QUESTIONS:
        ours = t.family.headed_visual_inputs(t.processor, t.images, [question] * len(t.images))
        theirs = t.processor(images=t.images, text=question, max_patches=64, return_tensors="pt")
        assert "decoder_input_ids" not in theirs
        assert torch.equal(ours.pixels, theirs["flattened_patches"].float())
        rendered = t.family.rendered(t.processor, t.images, [question] * len(t.images))
        assert ours.image_sizes == [(image.height, image.width) for image in rendered]
        assert [int(m.sum()) for m in theirs["attention_mask"]] == \
            [patch_grid(*size, 4, 4, 64)[0] * patch_grid(*size, 4, 4, 64)[1] for size in ours.image_sizes]
        seen.append(ours.pixels)
    assert not torch.equal(seen[0], seen[1])
    translucent = t.images[0].convert("RGBA")
    translucent.putpixel((3, 3), (10, 20, 30, 100))  # transparency is composited onto white before the header
    for picture in (translucent, t.images[1].convert("L")):
        ours = t.family.headed_visual_inputs(t.processor, [picture], [QUESTIONS[1]]).pixels
        theirs = t.processor(images=[picture], text=QUESTIONS[1], max_patches=64, return_tensors="pt")
        assert torch.equal(ours, theirs["flattened_patches"].float()), picture.mode
    assert torch.equal(extract_patches(t.processor, t.family.rendered(t.processor, t.images))[0],
                       t.family.visual_inputs(t.processor, t.images).pixels)  # no question: an empty header


def test_vqa_reference_is_transformers_generate(tiny: TinyCache, monkeypatch: pytest.MonkeyPatch) -> None:
    """What validation compares with (reference_generate with the question) is transformers' own generate() on the
    processor's output for the image and question."""
    from vlmforge.families.pix2struct import HEADER_FONT_FILE

    t = tiny(VQA)
    use_font_for_transformers(monkeypatch, t.processor, t.model_dir / HEADER_FONT_FILE)
    for image, question in zip(t.images, QUESTIONS * 2):
        inputs = t.processor(images=[image], text=question, max_patches=64, return_tensors="pt")
        with torch.no_grad():
            out = t.model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        ours = t.family.reference_generate(t.model, t.processor, image, question, MAX_NEW_TOKENS)
        assert [int(x) for x in out[0, 1:]][: len(ours.tokens)] == list(ours.tokens)


def test_the_header_font_travels_with_the_processor(tiny: TinyCache, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """save_processor writes the checkpoint's header font beside the processor's files (load_processor finds it
    there); a VQA checkpoint without one takes transformers' (the hub's), and where the hub is out of reach the
    error names the file to put there. A captioning checkpoint gets no font."""
    import huggingface_hub

    from vlmforge.families.pix2struct import HEADER_FONT_FILE, header_font

    t = tiny(VQA)
    t.family.save_processor(t.processor, t.model_dir, tmp_path / "saved")
    saved = tmp_path / "saved" / HEADER_FONT_FILE
    assert saved.read_bytes() == (t.model_dir / HEADER_FONT_FILE).read_bytes()
    assert header_font(t.family.load_processor(tmp_path / "saved")) == str(saved)
    bare = t.family.load_processor(tmp_path / "saved")
    delattr(bare, "_vlmforge_header_font")

    def offline(*args: object, **kwargs: object) -> str:
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(SourceError, match=f"no {HEADER_FONT_FILE} beside its processor files.*ybelkada/fonts/Arial.TTF"
                                          f".*OSError: no network.*as {HEADER_FONT_FILE}"):
        t.family.save_processor(bare, tmp_path / "bare", tmp_path / "bare-saved")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *args, **kwargs: str(saved))
    t.family.save_processor(bare, tmp_path / "bare", tmp_path / "fetched")
    assert (tmp_path / "fetched" / HEADER_FONT_FILE).read_bytes() == saved.read_bytes()
    caption = tiny(NAME)
    caption.family.save_processor(caption.processor, caption.model_dir, tmp_path / "caption")
    assert not (tmp_path / "caption" / HEADER_FONT_FILE).exists()
