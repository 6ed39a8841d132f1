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
    features: torch.Tensor
    refs: list[GenResult]
    _onnx: OnnxExportInfo | None = field(default=None, repr=False)

    def onnx(self) -> OnnxExportInfo:
        """The visual module exported once (batch-2 example, dynamic batch)."""
        from vlmforge.toolchains.hf.onnx import export_onnx

        if self._onnx is None:
            self._onnx = export_onnx(self.family.visual_module(self.model), self.work / "visual.onnx",
                                     self.pixel_values[:2])
        return self._onnx


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

        from vlmforge.modeling.images import synthetic_images

        family = family_of_tiny(name)
        work = self.root / name
        model_dir = work / "model"
        family.make_tiny_source(f"tiny://{name}", model_dir, seed=0)
        model = family.load_model(model_dir, torch.float32)
        processor = family.load_processor(model_dir)
        prompt = family.format_prompt(family.golden_prompt)
        images = synthetic_images()
        pixel_values = family.pixel_values(processor, images)
        with torch.no_grad():
            features = family.visual_module(model)(pixel_values)
        refs = [family.reference_generate(model, processor, image, prompt, MAX_NEW_TOKENS) for image in images]
        return Tiny(family, model_dir, work, model, processor, prompt, images, pixel_values, features, refs)
