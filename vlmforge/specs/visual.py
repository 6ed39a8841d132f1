"""The visual contract: what a family's images become for its LLM, declared once per family and spec.

Today's families resize every image to one size and give a fixed number of visual tokens (BLIP-2 32, LLaVA-1.5 576,
Nougat 588). The next ones count tokens by each image's size (LLaVA-NeXT tiles, Qwen2-VL's dynamic resolution),
carry several images per prompt, index positions on more than one axis (Qwen2-VL's M-RoPE) or feed their visual
states to cross-attention instead of the prompt (mllama). :class:`VisualContract` says all of it in one typed value
(``ModelFamily.visual_contract``); the derived budgets (:mod:`vlmforge.specs.derived`) are computed from it alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from vlmforge.specs.schema import ImageSize


class VisualPlacement(StrEnum):
    """Where the visual engine's output goes in the LLM."""

    PROMPT = "prompt"
    """Rows replace placeholder tokens of a decoder's prompt (TensorRT-LLM's prompt table): LLaVA, VILA, BLIP-2 OPT."""
    ENCODER_INPUT = "encoder_input"
    """Rows are positions of an encoder-decoder LLM's encoder input, before the text: BLIP-2 T5."""
    CROSS_ATTENTION = "cross_attention"
    """Rows are encoder states a decoder cross-attends to; the prompt holds none of them: Nougat (and mllama)."""

    @property
    def takes_input_positions(self) -> bool:
        """The visual tokens count against the LLM's input length (max_input_len)."""
        return self is not VisualPlacement.CROSS_ATTENTION


@dataclass(frozen=True)
class FamilyNumber:
    """One family-specific number of a plan and how it was reached (an ``--explain`` line)."""

    name: str
    value: int | str
    formula: str
    note: str = ""


@dataclass(frozen=True)
class VisualContract:
    """What one image and one prompt take, for one family and spec (numbers at the spec's largest image)."""

    placement: VisualPlacement
    tokens_per_image: int
    """Visual tokens (rows the LLM reads) of the largest image the spec allows; families that resize every image to
    one size give this count for any image."""
    tokens_source: str
    """Where the count comes from, for explanations (``architecture.num_visual_features``, the family's default or
    formula)."""
    max_image_size: ImageSize | None = None
    """The image size the tokens were counted at: the spec's visual.max_image_size or the family's default; None where
    every image is resized to the vision tower's own size."""
    engine_inputs_per_image: int = 1
    """Visual-engine batch entries one image of that size takes (1; tiling families: the tiles, e.g. LLaVA-NeXT 5)."""
    max_images_per_prompt: int | None = 1
    """The most images one prompt can carry in this family (its prompt format and LLM); None: no limit of its own."""
    position_id_dims: int = 1
    """Axes of the LLM's position ids: 1, or 3 for Qwen2-VL's M-RoPE (time, height, width)."""
    dynamic_spatial_axes: bool = False
    """The visual engine takes images of their own height and width (the ONNX export marks both axes dynamic)."""
    family_numbers: tuple[FamilyNumber, ...] = ()
    """Numbers only this family's plan passes (Qwen2-VL's --max_hw_dims, the tile grid of LLaVA-NeXT's largest
    image), with how each was reached: ``vlmforge plan --explain`` lists them after the shared ones."""

    @property
    def size_dependent(self) -> bool:
        """The token count depends on the image's size (the spec's visual.max_image_size applies)."""
        return self.max_image_size is not None
