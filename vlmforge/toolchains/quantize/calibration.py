"""Calibration data for quantizing a VLM's LLM: images and prompts, turned into the embeddings the LLM receives.

Each sample goes through the family's own hooks (``pixel_values`` -> ``visual_module`` -> ``llm_prefix``), so the
LLM is calibrated on its prompt template with the image's visual features spliced in, exactly as it is fed when it
serves (text-only AWQ calibration is a known cause of wrong VLM outputs, TensorRT-LLM #1860). The set's digest
(every image's pixels and every prompt, in order) goes into the quantize stage's fingerprint.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from vlmforge.errors import SpecError
from vlmforge.specs.schema import Calibration

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from vlmforge.families.base import ModelFamily

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
PROMPTS_FILE = "prompts.txt"
SYNTHETIC_SIZE = 96
SYNTHETIC_PROMPTS = (
    "Describe the image.",
    "What is shown in this picture?",
    "Question: which city is this? Answer:",
    "What colors do you see?",
    "How many objects are in the image?",
    "Write a short caption for this photo.",
    "Is there any text in the image? What does it say?",
    "Describe the shapes and their positions.",
    "What is in the top left corner?",
    "Please describe the traffic condition.",
    "Question: what is the main object? Answer:",
    "Give a detailed description of the scene.",
)
"""The synthetic set's prompts: captioning and question answering, short and long, in turn."""


@dataclass(frozen=True)
class Sample:
    image: Image.Image
    prompt: str | None


@dataclass(frozen=True)
class CalibrationSet:
    """The samples and their content digest."""

    samples: list[Sample]
    digest: str
    source: str

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "samples": len(self.samples), "digest": self.digest}


def _synthetic_image(rng: np.random.Generator, size: int) -> Image.Image:
    """One of four kinds of deterministic picture: gradient, blocks, discs, noise texture (with a base colour)."""
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    kind = int(rng.integers(4))
    colour = rng.random(3).astype(np.float32)
    if kind == 0:
        angle = rng.random() * np.pi
        ramp = np.cos(angle) * x + np.sin(angle) * y
        pixels = ramp[..., None] * colour + (1 - ramp[..., None]) * rng.random(3).astype(np.float32)
    elif kind == 1:
        pixels = np.ones((size, size, 3), np.float32) * colour * 0.3
        for _ in range(int(rng.integers(2, 6))):
            x0, y0 = rng.integers(0, size - 8, 2)
            w, h = rng.integers(8, size // 2, 2)
            pixels[y0:y0 + h, x0:x0 + w] = rng.random(3)
    elif kind == 2:
        pixels = np.ones((size, size, 3), np.float32) * rng.random(3).astype(np.float32)
        for _ in range(int(rng.integers(1, 5))):
            cx, cy, r = rng.random(), rng.random(), 0.05 + 0.25 * rng.random()
            pixels[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.random(3)
    else:
        pixels = np.clip(colour + 0.35 * rng.standard_normal((size, size, 3)).astype(np.float32), 0, 1)
    return Image.fromarray((np.clip(pixels, 0, 1) * 255).round().astype(np.uint8), "RGB")


def _digest(samples: Sequence[Sample]) -> str:
    digest = hashlib.sha256()
    for sample in samples:
        image = sample.image.convert("RGB")
        digest.update(f"{image.size[0]}x{image.size[1]}\0".encode())
        digest.update(image.tobytes())
        digest.update(b"\0" + (sample.prompt or "").encode() + (b"\1" if sample.prompt is None else b"\0"))
    return digest.hexdigest()


def synthetic_set(size: int, seed: int = 0) -> CalibrationSet:
    """``size`` generated images, each with the next prompt of :data:`SYNTHETIC_PROMPTS` (deterministic per seed)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(SYNTHETIC_PROMPTS))
    samples = [Sample(_synthetic_image(rng, SYNTHETIC_SIZE), SYNTHETIC_PROMPTS[order[i % len(order)]])
               for i in range(size)]
    return CalibrationSet(samples, _digest(samples), "synthetic")


def folder_set(calibration: Calibration, default_prompt: str | None) -> CalibrationSet:
    """The first ``size`` images of the folder (by name) with prompts.txt's lines in turn (else ``default_prompt``)."""
    from PIL import Image, UnidentifiedImageError

    folder = calibration.folder
    assert folder is not None
    path = "quantization.calibration.source"
    if not folder.is_dir():
        raise SpecError(f"calibration folder {folder} does not exist (or is not a folder)", path=path)
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if len(images) < calibration.size:
        raise SpecError(f"calibration.size is {calibration.size} but {folder} holds {len(images)} images "
                        f"({', '.join(IMAGE_SUFFIXES)}): lower quantization.calibration.size or add images", path=path)
    prompts_file = folder / PROMPTS_FILE
    prompts: list[str | None] = [default_prompt]
    if prompts_file.is_file():
        lines = [line.strip() for line in prompts_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not lines:
            raise SpecError(f"{prompts_file} is empty: one prompt per line, or remove it", path=path)
        prompts = list(lines)
    samples = []
    for index, image_path in enumerate(images[:calibration.size]):
        try:
            with Image.open(image_path) as image:
                samples.append(Sample(image.convert("RGB"), prompts[index % len(prompts)]))
        except (OSError, UnidentifiedImageError) as exc:
            raise SpecError(f"calibration image {image_path} cannot be read: {exc}", path=path) from None
    return CalibrationSet(samples, _digest(samples), str(folder))


def calibration_set(calibration: Calibration, family: ModelFamily) -> CalibrationSet:
    """The spec's calibration set (checked before any model is loaded)."""
    if calibration.folder is None:
        return synthetic_set(calibration.size, calibration.seed)
    return folder_set(calibration, family.golden_prompt)


def golden_set(family: ModelFamily, prompt: str | None = None) -> list[Sample]:
    """The three golden validation images with the validation prompt: what the checks compare logits on."""
    from vlmforge.modeling.images import synthetic_images

    text = prompt if prompt is not None else family.golden_prompt
    return [Sample(image, text) for image in synthetic_images()]


def llm_batches(family: ModelFamily, model: Any, processor: Any, llm: Any, samples: Sequence[Sample],
                batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Forward arguments of ``llm`` for the samples, ``batch_size`` at a time, as the runner feeds it: each image
    through the family's visual path (``visual_inputs`` -> ``visual_outputs`` on the torch ``visual_module`` ->
    ``pack_visual_features``: anyres tiles and newlines, Qwen2-VL's rows), its prompt through ``llm_prefix``, and the
    prefixes left-padded by the runner's own :func:`vlmforge.runner.states.prefill_inputs` (M-RoPE positions,
    token_type_ids)."""
    import tempfile
    from pathlib import Path

    import torch

    from vlmforge.modeling.devices import model_device, model_dtype
    from vlmforge.runner.states import prefill_inputs

    visual = family.visual_module(model).eval()
    with tempfile.TemporaryDirectory() as folder:
        family.save_visual_extras(model, Path(folder))
        extras = family.load_visual_extras(Path(folder))
    device = model_device(llm)
    batches = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        prefixes = []
        with torch.no_grad():
            for sample in chunk:
                inputs = family.visual_inputs(processor, [sample.image])
                inputs.pixels = inputs.pixels.to(model_device(visual), model_dtype(visual))
                (outputs,) = inputs.split_outputs(family.visual_outputs(visual, inputs))
                features = family.pack_visual_features(processor, outputs, inputs.image_sizes[0], extras)
                prefixes.append(family.llm_prefix(llm, processor, features.to(device), sample.prompt))
        batches.append({name: value.detach().to(device) for name, value in prefill_inputs(prefixes).items()})
    return batches
