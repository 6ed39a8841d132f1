"""Calibration data: the synthetic set, a folder of images and prompts, and the prefixes the LLM is calibrated on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers.tiny import QUANTIZABLE, TinyCache, pack_features
from vlmforge.errors import SpecError
from vlmforge.families import resolve
from vlmforge.families.tinykit import IMAGE_ID
from vlmforge.specs.catalog import load_model_or_spec
from vlmforge.specs.schema import Calibration
from vlmforge.toolchains.quantize.calibration import folder_set, llm_batches, synthetic_set
from vlmforge.toolchains.quantize.hf import calibration_digest

pytestmark = pytest.mark.container  # runs inside NVIDIA's TensorRT-LLM 1.2 image: CI runs it again there


def write_images(folder: Path, count: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        pixels = np.full((20, 30, 3), 10 * i, np.uint8)
        Image.fromarray(pixels, "RGB").save(folder / f"img{i:02d}.png")


def test_the_synthetic_set_is_deterministic_and_its_digest_follows_its_content() -> None:
    a, b = synthetic_set(5, seed=0), synthetic_set(5, seed=0)
    assert a.digest == b.digest and len(a.samples) == 5
    assert [s.prompt for s in a.samples] == [s.prompt for s in b.samples]
    assert len({s.prompt for s in a.samples}) == 5  # varied prompts
    assert synthetic_set(5, seed=1).digest != a.digest and synthetic_set(6, seed=0).digest != a.digest
    assert synthetic_set(6, seed=0).samples[0].image.tobytes() == a.samples[0].image.tobytes()


def test_a_folder_of_images_and_prompts(tmp_path: Path) -> None:
    write_images(tmp_path / "set", 4)
    (tmp_path / "set" / "prompts.txt").write_text("first?\n\nsecond?\n")
    (tmp_path / "set" / "notes.md").write_text("not an image")
    calibration = Calibration(source=f"file://{tmp_path / 'set'}", size=3)
    got = folder_set(calibration, "golden")
    assert [s.prompt for s in got.samples] == ["first?", "second?", "first?"]
    assert got.samples[1].image.getpixel((0, 0)) == (10, 10, 10)
    (tmp_path / "set" / "prompts.txt").unlink()
    without = folder_set(Calibration(source=str(tmp_path / "set"), size=3), "golden")
    assert {s.prompt for s in without.samples} == {"golden"} and without.digest != got.digest
    write_images(tmp_path / "set", 4)  # the same files again: the same digest
    assert folder_set(Calibration(source=str(tmp_path / "set"), size=3), "golden").digest == without.digest


@pytest.mark.parametrize(("setup", "message"), [
    ("missing", "does not exist"),
    ("few", "calibration.size is 3 but .* holds 2 images"),
    ("empty-prompts", "prompts.txt is empty"),
    ("broken", "cannot be read"),
])
def test_bad_folders_are_refused_naming_the_field(setup: str, message: str, tmp_path: Path) -> None:
    folder = tmp_path / "set"
    if setup != "missing":
        write_images(folder, 2 if setup == "few" else 3)
    if setup == "empty-prompts":
        (folder / "prompts.txt").write_text("\n \n")
    if setup == "broken":
        (folder / "img01.png").write_bytes(b"not a png")
    with pytest.raises(SpecError, match=message) as err:
        folder_set(Calibration(source=str(folder), size=3), None)
    assert err.value.path == "quantization.calibration.source"


def test_the_spec_refuses_a_remote_calibration_source() -> None:
    with pytest.raises(SpecError, match="calibration data comes from `synthetic` or a local folder"):
        load_model_or_spec("tiny-llava", {"quantization.calibration.source": "s3://bucket/set"})


def test_the_digest_is_in_the_quantize_fingerprint_only_where_something_is_calibrated(tmp_path: Path) -> None:
    write_images(tmp_path / "set", 4)

    def digest(**overrides: object) -> str | None:
        return calibration_digest(resolve(load_model_or_spec("tiny-llava", overrides)))

    awq = {"quantization.method": "int4_awq"}
    assert digest(**awq) == synthetic_set(32).digest
    assert digest(**awq, **{"quantization.calibration.seed": 3}) != digest(**awq)
    folder = digest(**awq, **{"quantization.calibration.source": str(tmp_path / "set"), "quantization.calibration.size": 4})
    assert folder not in (None, digest(**awq))
    assert digest(**{"quantization.method": "int8_wo"}) is None


@pytest.mark.parametrize("name", QUANTIZABLE)
def test_prefixes_carry_the_visual_features_left_padded(name: str, tiny: TinyCache, tmp_path: Path) -> None:
    """The LLM is calibrated on what it is fed when it serves: each sample's prefix (the family's visual path, its
    prompt template with the image rows spliced in) left-padded, with its own position ids (Qwen2-VL's M-RoPE:
    [3, B, L]) and extra inputs (Gemma3's token_type_ids)."""
    t = tiny(name)
    llm = t.family.extract_llm(t.model)
    samples = synthetic_set(3).samples
    (batch,) = llm_batches(t.family, t.model, t.processor, llm, samples, batch_size=3)
    embeds, mask, positions = batch["inputs_embeds"], batch["attention_mask"], batch["position_ids"]
    assert embeds.shape[:2] == mask.shape == positions.shape[-2:] and embeds.shape[0] == 3
    lengths = mask.sum(-1)
    assert lengths.min() < lengths.max()  # prompts of different lengths, padded on the left
    visual = t.family.visual_module(t.model)
    image_id = getattr(t.model.config, "image_token_id", None) or getattr(t.model.config, "image_token_index", IMAGE_ID)
    for row, sample in enumerate(samples):
        pad = int(embeds.shape[1] - lengths[row])
        with torch.no_grad():
            inputs = t.family.visual_inputs(t.processor, [sample.image])
            (features,) = pack_features(t.family, t.processor, [sample.image], t.family.visual_outputs(visual, inputs),
                                        t.model, tmp_path / "extras")
            prefix = t.family.llm_prefix(llm, t.processor, features, sample.prompt)
        assert mask[row, :pad].sum() == 0 and torch.allclose(embeds[row, pad:], prefix.embeds[0], atol=1e-6)
        want = torch.arange(int(lengths[row])) if prefix.positions is None else prefix.positions[:, 0]
        assert torch.equal(positions[..., row, pad:], want)
        if prefix.token_type_ids is not None:
            assert batch["token_type_ids"][row, :pad].sum() == 0
            assert torch.equal(batch["token_type_ids"][row, pad:], prefix.token_type_ids[0])
        if prefix.cross_states is not None:  # mllama: the rows are cross-attention states, beside the prompt
            states = prefix.cross_states.shape[1]
            assert torch.allclose(batch["cross_attention_states"][row, :states], prefix.cross_states[0], atol=1e-6)
            assert batch["cross_attention_mask"][row, :pad].sum() == 0
            continue
        image_rows = embeds[row, pad:]
        rows = features.reshape(-1, features.shape[-1])  # Qwen2-VL's keep their grid: [1, h, w, hidden]
        matches = [(image_rows - f).abs().max(-1).values.lt(1e-5).sum().item() for f in rows]
        assert sum(matches) >= rows.shape[0]  # every visual feature row is in the prefix
        if t.family.name != "kosmos2":  # Kosmos-2 keeps its <image> ... </image> boundary tokens around the rows
            token_embeds = llm.get_input_embeddings().weight[image_id]
            assert not (image_rows - token_embeds).abs().max(-1).values.lt(1e-6).any()  # no image placeholder left
