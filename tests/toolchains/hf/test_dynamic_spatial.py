"""The ONNX visual export keeps height and width dynamic where a family's visual contract says so.

No registered family needs it yet (they all resize every image to one size), so a test-only LLaVA whose CLIP tower
interpolates its position embeddings to the image's own size (visual tokens = (H/14) x (W/14)) stands in for the
families of issue 15; ONNX Runtime is checked against torch at several sizes."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from vlmforge.errors import BuildError
from vlmforge.families import ResolvedSpec, get_family
from vlmforge.families.llava import LlavaFamily
from vlmforge.modeling.images import synthetic_images
from vlmforge.specs.catalog import load_model_or_spec
from vlmforge.specs.derived import derive
from vlmforge.specs.schema import BuildSpec, ImageSize
from vlmforge.toolchains.hf import stages
from vlmforge.toolchains.hf.onnx import OnnxRunError, compare_onnx, export_onnx, run_onnx

PATCH = 14


class NativeSizeLlava(LlavaFamily):
    """LLaVA that reads each image at its own size: a stand-in for a dynamic-resolution family (not registered)."""

    size_dependent_tokens: ClassVar[bool] = True
    dynamic_spatial_axes: ClassVar[bool] = True
    default_max_image_size: ClassVar[ImageSize | None] = ImageSize(height=112, width=112)
    spatial_check_size: ClassVar[ImageSize | None] = ImageSize(height=70, width=84)

    def visual_tokens(self, spec: BuildSpec, size: ImageSize | None) -> int:
        assert size is not None
        return (size.height // PATCH) * (size.width // PATCH)

    def pixel_values(self, processor: Any, images: list[Any]) -> torch.Tensor:
        return processor.image_processor(images, do_resize=False, do_center_crop=False,
                                         return_tensors="pt")["pixel_values"].to(torch.float32)

    def visual_module(self, model: Any) -> torch.nn.Module:
        return _NativeSizeVisual(model).eval()


class _NativeSizeVisual(torch.nn.Module):
    def __init__(self, model: Any) -> None:
        super().__init__()
        self.tower, self.projector = model.model.vision_tower, model.model.multi_modal_projector

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.tower(pixel_values, output_hidden_states=True, return_dict=True, interpolate_pos_encoding=True)
        return self.projector(out.hidden_states[-2][:, 1:])


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llava")
    get_family("llava").make_tiny(path)
    return path


def pixels(family: Any, processor: Any, height: int, width: int, count: int = 2) -> torch.Tensor:
    return family.pixel_values(processor, [image.resize((width, height)) for image in synthetic_images()[:count]])


def test_dynamic_spatial_axes_run_in_onnx_runtime_at_other_sizes(tiny_llava: Path, tmp_path: Path) -> None:
    family = NativeSizeLlava()
    model, processor = family.load_model(tiny_llava, torch.float32), family.load_processor(tiny_llava)
    module = family.visual_module(model)
    example = pixels(family, processor, 70, 84)
    info = export_onnx(module, tmp_path / "dynamic.onnx", example, dynamic_spatial=True)
    spec = load_model_or_spec("tiny-llava")
    for height, width, batch in ((56, 56, 1), (70, 84, 3), (112, 98, 2)):
        batch_pixels = pixels(family, processor, height, width, batch)
        report = compare_onnx(info.path, module, batch_pixels)
        assert report["max_rel_to_scale"] < 1e-4, (height, width, report)
        tokens = run_onnx(info.path, batch_pixels).shape[1]
        assert tokens == family.visual_tokens(spec, ImageSize(height=height, width=width))
    # the same module exported with today's fixed axes takes its example's size only
    fixed = export_onnx(module, tmp_path / "fixed.onnx", example, dynamic_spatial=False)
    assert compare_onnx(fixed.path, module, example)["max_rel_to_scale"] < 1e-4
    with pytest.raises(OnnxRunError, match=r"cannot run fixed.onnx on an input of shape \(1, 3, 56, 56\)"):
        run_onnx(fixed.path, pixels(family, processor, 56, 56, 1))


def test_the_visual_stage_exports_and_checks_two_sizes_for_a_dynamic_family(tiny_llava: Path, tmp_path: Path) -> None:
    spec = load_model_or_spec("tiny-llava", {"visual.max_image_size": {"height": 70, "width": 84}})
    family = NativeSizeLlava()
    derived = derive(spec, family)
    assert derived.num_visual_features == 30 and derived.max_multimodal_len == spec.limits.max_batch_size * 30
    result = stages.build_visual(ResolvedSpec(spec, family, derived), tiny_llava, tmp_path / "out")
    assert result.output_shape == ["batch", "tokens", 64] and result.max_rel_to_scale < 1e-4
    onnx = tmp_path / "out" / "vision" / "model.onnx"
    processor = family.load_processor(tiny_llava)
    assert run_onnx(onnx, pixels(family, processor, 56, 56, 1)).shape == (1, 16, 64)
    assert run_onnx(onnx, pixels(family, processor, 70, 84, 1)).shape == (1, 30, 64)


def test_a_dynamic_family_whose_export_comes_out_fixed_fails_the_visual_stage(
        tiny_llava: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stage's second-size check is what proves the axes: an export that ignored the flag is refused."""
    spec = load_model_or_spec("tiny-llava", {"visual.max_image_size": {"height": 70, "width": 84}})
    family = NativeSizeLlava()
    from vlmforge.toolchains.hf import onnx as onnx_module

    original = onnx_module.export_onnx

    def fixed_export(*args: Any, **kwargs: Any) -> Any:
        return original(*args, **{**kwargs, "dynamic_spatial": False})

    monkeypatch.setattr(onnx_module, "export_onnx", fixed_export)
    with pytest.raises(BuildError, match=r"visual engine check failed \(dynamo export\): ONNX Runtime cannot run "
                                         r"model.onnx on an input of shape \(1, 3, 64, 64\)"):
        stages.build_visual(ResolvedSpec(spec, family, derive(spec, family)), tiny_llava, tmp_path / "out")
