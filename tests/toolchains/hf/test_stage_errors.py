"""Bad checkpoints fail the stage that meets them with a message naming the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlmforge.errors import SourceError, SpecError, ToolchainUnavailable
from vlmforge.families import get_family, resolve
from vlmforge.specs.catalog import load_model_or_spec
from vlmforge.toolchains.hf import stages


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llava")
    get_family("llava").make_tiny(path)
    return path


def test_missing_processor_files_are_named(tiny_llava: Path, tmp_path: Path) -> None:
    import shutil

    broken = tmp_path / "ckpt"
    shutil.copytree(tiny_llava, broken)
    (broken / "preprocessor_config.json").unlink(missing_ok=True)
    (broken / "processor_config.json").unlink(missing_ok=True)
    with pytest.raises(SourceError, match="missing processor files in .*preprocessor_config.json"):
        stages.convert(resolve(load_model_or_spec("tiny-llava")), broken, tmp_path / "out")


def test_architecture_facts_are_checked_against_the_spec(tiny_llava: Path, tmp_path: Path) -> None:
    resolved = resolve(load_model_or_spec("tiny-llava", {"architecture.num_visual_features": 576,
                                                          "limits.max_input_len": 1024}))
    with pytest.raises(SpecError, match="the spec says 576 but the checkpoint's config.json gives 16"):
        stages.convert(resolved, tiny_llava, tmp_path / "out")


def test_unsupported_requests_are_refused_before_work() -> None:
    for method in ("int4_awq", "w4a8_awq", "int8_sq", "fp8", "int8_wo", "int4_wo"):  # all built on the hf toolchain
        stages.check_supported(resolve(load_model_or_spec("tiny-llava", {"quantization.method": method})))
    with pytest.raises(ToolchainUnavailable, match="float KV cache"):
        stages.check_supported(resolve(load_model_or_spec("tiny-llava", {"quantization.method": "int8_wo",
                                                                          "quantization.kv_cache_dtype": "fp8"})))
    stages.check_supported(resolve(load_model_or_spec("vila-7B")))  # VILA needs no VILA code on the hf toolchain
    stages.check_supported(resolve(load_model_or_spec("vila-7B", {"quantization.method": "int4_awq"})))


def test_a_vila15_checkpoint_without_its_image_processor_is_named(tmp_path: Path) -> None:
    """VILA1.5 keeps its tokenizer in llm/ and its image processor in vision_tower/: those are what must exist."""
    source = tmp_path / "ckpt"
    get_family("vila").make_tiny(source)
    (source / "vision_tower" / "preprocessor_config.json").unlink()
    with pytest.raises(SourceError, match="missing processor files in .*vision_tower/preprocessor_config.json"):
        stages.convert(resolve(load_model_or_spec("tiny-vila")), source, tmp_path / "out")
