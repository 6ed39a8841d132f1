"""The visual stage's fingerprint: the vision tensors' content and the vision configs, nothing of the LLM."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers.checkpoints import new_llm_weights
from tests.helpers.tiny import TINY_MODELS, family_of_tiny
from vlmforge.build.weights import tensor_index, tensors_digest, visual_inputs_digest
from vlmforge.errors import SourceError
from vlmforge.families import get_family

FAMILIES = TINY_MODELS
"""Every tiny model of every hf family, from the registry (VILA's in both its layouts)."""


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for name in FAMILIES:
        family_of_tiny(name).make_tiny_source(f"tiny://{name}", root / name)
        out[name] = root / name
    return out


def _digest(family_name: str, model_dir: Path) -> str:
    family = family_of_tiny(family_name)
    inputs = visual_inputs_digest(model_dir, family.visual_weight_prefixes, family.llm_config_keys,
                                  family.visual_config_files)
    assert inputs is not None
    return inputs.digest


def _visual_features(family_name: str, model_dir: Path) -> torch.Tensor:
    from vlmforge.modeling.images import synthetic_images

    family = family_of_tiny(family_name)
    model = family.load_model(model_dir, torch.float32)
    module = family.visual_module(model).eval()
    with torch.no_grad():
        return family.visual_outputs(module, family.visual_inputs(family.load_processor(model_dir), synthetic_images(64)))


@pytest.mark.parametrize("name", FAMILIES)
def test_the_prefixes_hold_everything_the_visual_engine_computes_with(tiny_models: dict[str, Path], name: str,
                                                                      tmp_path: Path) -> None:
    """New LLM weights: same digest and bit-identical visual features. A vision tensor changed: another digest."""
    family = family_of_tiny(name)
    before_dir = tiny_models[name]
    after_dir = tmp_path / "llm-changed"
    shutil.copytree(before_dir, after_dir)
    edited = new_llm_weights(after_dir, family, seed=7, scale=0.5)
    index = tensor_index(before_dir)
    visual = [n for n in index if n.startswith(family.visual_weight_prefixes)]
    assert visual and edited == len(index) - len(visual) > 0
    llm_file = next(info.file for n, info in index.items() if n not in visual)
    assert (after_dir / llm_file).read_bytes() != (before_dir / llm_file).read_bytes()

    assert _digest(name, after_dir) == _digest(name, before_dir)
    # If a prefix were missing, the visual module would see the noise added to its tensors.
    assert torch.equal(_visual_features(name, after_dir), _visual_features(name, before_dir))

    vision_changed = tmp_path / "vision-changed"
    shutil.copytree(before_dir, vision_changed)
    first = min(visual)
    vision_file = vision_changed / index[first].file
    tensors = load_file(str(vision_file))
    tensors[first] = tensors[first] + 1
    save_file(tensors, str(vision_file), metadata={"format": "pt"})
    assert _digest(name, vision_changed) != _digest(name, before_dir)


def test_configs_count_except_the_llm_part(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    base = _digest("llava", tiny_models["llava"])

    def variant(edit_file: str, edit) -> str:
        target = tmp_path / f"v{len(list(tmp_path.iterdir()))}"
        shutil.copytree(tiny_models["llava"], target)
        data = json.loads((target / edit_file).read_text())
        edit(data)
        (target / edit_file).write_text(json.dumps(data))
        return _digest("llava", target)

    assert variant("config.json", lambda c: c["text_config"].update(rope_theta=1234.0)) == base
    assert variant("config.json", lambda c: c.update(vision_feature_layer=-1)) != base
    assert variant("config.json", lambda c: c["vision_config"].update(layer_norm_eps=1e-3)) != base
    assert variant("processor_config.json", lambda c: c["image_processor"].update(image_mean=[0.5, 0.5, 0.5])) != base


def test_vila_sub_folder_configs_count_except_the_llm_part(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """VILA1.5 keeps the tower's and projector's configs in sub-folders: they count (they are what the loader reads);
    the LLM's config, in llm/ and as llm_cfg in config.json, does not."""
    base = _digest("vila", tiny_models["vila"])

    def variant(edit_file: str, edit) -> str:
        target = tmp_path / f"v{len(list(tmp_path.iterdir()))}"
        shutil.copytree(tiny_models["vila"], target)
        data = json.loads((target / edit_file).read_text())
        edit(data)
        (target / edit_file).write_text(json.dumps(data))
        return _digest("vila", target)

    assert variant("config.json", lambda c: c["llm_cfg"].update(rope_theta=1234.0)) == base
    assert variant("llm/config.json", lambda c: c.update(rope_theta=1234.0)) == base
    assert variant("config.json", lambda c: c.update(mm_vision_select_layer=-1)) != base
    assert variant("vision_tower/config.json", lambda c: c.update(layer_norm_eps=1e-3)) != base
    assert variant("vision_tower/preprocessor_config.json", lambda c: c.update(image_mean=[0.4, 0.4, 0.4])) != base
    assert variant("mm_projector/config.json", lambda c: c.update(mm_projector_type="mlp2x_gelu")) != base
    # VILA 1.0: the LLaMA's keys are top-level; those only the LLM reads do not count, the mm_ ones do
    base10 = _digest("vila1.0", tiny_models["vila1.0"])
    shutil.copytree(tiny_models["vila1.0"], tmp_path / "v10")
    config = json.loads((tmp_path / "v10" / "config.json").read_text())
    (tmp_path / "v10" / "config.json").write_text(json.dumps(config | {"rope_theta": 1234.0, "rms_norm_eps": 1e-5}))
    assert _digest("vila1.0", tmp_path / "v10") == base10
    (tmp_path / "v10" / "config.json").write_text(json.dumps(config | {"image_aspect_ratio": "resize"}))
    assert _digest("vila1.0", tmp_path / "v10") != base10


def test_the_digest_does_not_depend_on_sharding(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    tensors = load_file(str(tiny_models["llava"] / "model.safetensors"))
    names = sorted(tensors)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    save_file({n: tensors[n] for n in names[::2]}, str(sharded / "model-00001-of-00002.safetensors"))
    save_file({n: tensors[n] for n in names[1::2]}, str(sharded / "model-00002-of-00002.safetensors"))
    prefixes = get_family("llava").visual_weight_prefixes
    assert tensors_digest(sharded, prefixes) == tensors_digest(tiny_models["llava"], prefixes)
    shutil.copy(sharded / "model-00001-of-00002.safetensors", sharded / "copy.safetensors")
    with pytest.raises(SourceError, match="is in both"):
        tensor_index(sharded)


def test_no_prefixes_or_no_match_falls_back_and_a_truncated_file_is_refused(tiny_models: dict[str, Path],
                                                                              tmp_path: Path) -> None:
    model = tiny_models["llava"]
    assert visual_inputs_digest(model, (), ("text_config",)) is None
    assert visual_inputs_digest(model, ("no.such.prefix.",), ()) is None
    broken = tmp_path / "broken"
    shutil.copytree(model, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[:-64])
    with pytest.raises(SourceError, match="truncated"):
        tensors_digest(broken, ("",))
    (broken / "model.safetensors").write_bytes(struct.pack("<Q", 10**12) + data[8:])
    with pytest.raises(SourceError, match="not a readable safetensors file"):
        tensor_index(broken)

