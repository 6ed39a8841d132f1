"""Tiny models for the hf-toolchain tests: each family is made, loaded and run through its reference
once per session (the ``tiny`` fixture), and its visual module exported to ONNX once."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmforge.families import ModelFamily, family_names, get_family

if TYPE_CHECKING:
    import torch

    from vlmforge.modeling.generation import GenResult
    from vlmforge.toolchains.hf.onnx import OnnxExportInfo

MAX_NEW_TOKENS = 16

HF_FAMILIES = [name for name in family_names() if get_family(name).hf_supported]
"""Every family the hf toolchain builds, from the registry: a new family is tested without editing a list."""
_MAKERS = {source.removeprefix("tiny://"): name for name in HF_FAMILIES for source in get_family(name).tiny_sources()}
TINY_MODELS = list(_MAKERS)
"""Every tiny model of those families (``llava``, ..., ``vila``, ``vila1.0``): the per-family tests run on each."""
QUANTIZABLE = [name for name in TINY_MODELS if get_family(_MAKERS[name]).quantizable]


def family_of_tiny(name: str) -> ModelFamily:
    """The family that makes ``tiny://name``."""
    return get_family(_MAKERS[name])


def tiny_spec(name: str) -> Any:
    """The catalog entry built from ``tiny://name``."""
    from vlmforge.specs.catalog import catalog_specs

    return next(spec for spec in catalog_specs() if spec.source == f"tiny://{name}")


def dir_digest(path: Path) -> str:
    """sha256 over (relative name, bytes) of every file under ``path``."""
    digest = hashlib.sha256()
    for file in sorted(Path(path).rglob("*")):
        if file.is_file():
            digest.update(str(file.relative_to(path)).encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()


@dataclass
class Tiny:
    """One family's tiny float32 model with its golden inputs and reference outputs."""

    family: ModelFamily
    model_dir: Path
    work: Path
    model: Any
    processor: Any
    prompt: str | None
    images: list[Any]
    pixel_values: torch.Tensor
    """The visual engine's inputs for every golden image (anyres families: each image's tiles)."""
    features: list[torch.Tensor]
    """Each golden image's visual features [1, N_i, hidden], as the runner makes them."""
    refs: list[GenResult]
    _onnx: OnnxExportInfo | None = field(default=None, repr=False)

    def pack(self, outputs: torch.Tensor, model: Any = None) -> list[torch.Tensor]:
        """Each golden image's features from the visual engine's ``outputs`` for :attr:`pixel_values` (or rows in
        their place), packed by the family with the extras ``model`` (default: the float32 one) saves."""
        return pack_features(self.family, self.processor, self.images, outputs, model or self.model,
                             self.work / f"extras-{id(model)}")

    def onnx(self) -> OnnxExportInfo:
        """The visual module exported once (batch-2 example, dynamic batch)."""
        from vlmforge.toolchains.hf.onnx import export_onnx

        if self._onnx is None and self.family.visual_engine_axes:  # several inputs (qwen2_vl): all images at once
            from vlmforge.toolchains.hf.onnx import export_onnx_feeds

            extras = self.extras()
            feed = self.family.visual_engine_feeds(self.family.visual_inputs(self.processor, self.images), 8, extras)
            assert feed
            self._onnx = export_onnx_feeds(self.family.visual_module(self.model), self.work / "visual.onnx", feed[0],
                                           self.family.visual_engine_axes)
        if self._onnx is None:
            self._onnx = export_onnx(self.family.visual_module(self.model), self.work / "visual.onnx",
                                     self.pixel_values[:2])
        return self._onnx

    def extras(self) -> dict[str, torch.Tensor]:
        """The visual extras the visual stage saves beside the engine (from the float32 model)."""
        folder = self.work / "extras"
        folder.mkdir(parents=True, exist_ok=True)
        self.family.save_visual_extras(self.model, folder)
        return self.family.load_visual_extras(folder)


def pack_features(family: ModelFamily, processor: Any, images: list[Any], outputs: torch.Tensor, model: Any,
                  extras_dir: Path) -> list[torch.Tensor]:
    """Each image's features [1, N, hidden] from visual-engine ``outputs`` (the runner's path: split by the images'
    engine inputs, packed with the extras the visual stage saves beside the engine)."""
    inputs = family.visual_inputs(processor, images)
    extras_dir.mkdir(parents=True, exist_ok=True)
    family.save_visual_extras(model, extras_dir)
    extras = family.load_visual_extras(extras_dir)
    return [family.pack_visual_features(processor, part, size, extras)
            for part, size in zip(inputs.split_outputs(outputs), inputs.image_sizes, strict=True)]


class TinyCache:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._made: dict[str, Tiny] = {}

    def __call__(self, name: str) -> Tiny:
        """The tiny model ``tiny://name`` (``llava``, ``vila1.0``...)."""
        if name not in self._made:
            self._made[name] = self._make(name)
        return self._made[name]

    def _make(self, name: str) -> Tiny:
        import torch

        family = family_of_tiny(name)
        work = self.root / name
        model_dir = work / "model"
        family.make_tiny_source(f"tiny://{name}", model_dir, seed=0)
        model = family.load_model(model_dir, torch.float32)
        processor = family.load_processor(model_dir)
        prompt = family.format_prompt(family.golden_prompt)
        images = family.golden_images()
        pixel_values = family.visual_inputs(processor, images).pixels
        with torch.no_grad():
            outputs = family.visual_outputs(family.visual_module(model), family.visual_inputs(processor, images))
            features = pack_features(family, processor, images, outputs, model, work / "extras")
        refs = [family.reference_generate(model, processor, image, prompt, MAX_NEW_TOKENS) for image in images]
        return Tiny(family, model_dir, work, model, processor, prompt, images, pixel_values, features, refs)
