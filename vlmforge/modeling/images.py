"""Images as the models see them: the golden synthetic images and the processor's pixel values."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch
    from PIL import Image  # imported where images are made: the GPU benchmark machine has no Pillow

GOLDEN_IMAGE_SIZE = 64
"""Side of the golden validation images (every toolchain validates on the same three)."""


def synthetic_images(size: int = GOLDEN_IMAGE_SIZE) -> list[Image.Image]:
    """The three golden RGB images: a colour gradient, a checkerboard, rings and blocks."""
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    grad = np.stack([x, y, 1.0 - x * y], -1)
    cb = (((np.arange(size)[:, None] // 8) + (np.arange(size)[None, :] // 8)) % 2).astype(np.float32)
    checker = np.stack([cb, 1.0 - cb, 0.5 * cb], -1)
    r = np.hypot(x - 0.5, y - 0.5)
    rings = np.stack([(np.sin(r * 40) + 1) / 2, (x > 0.5).astype(np.float32), (y > 0.5) * 0.8], -1)
    return [Image.fromarray((a * 255).round().astype(np.uint8), "RGB") for a in (grad, checker, rings)]


def image_processor_pixel_values(processor: Any, images: Sequence[Image.Image]) -> torch.Tensor:
    """``processor.image_processor(images)`` as a float32 CPU tensor [B, 3, H, W]."""
    import torch  # here, not at the top: the build CLI's checks import this module and must not wait for torch

    out = processor.image_processor(images=list(images), return_tensors="pt")
    return out["pixel_values"].to(torch.float32)
