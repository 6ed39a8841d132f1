"""The visual contract of a model family: what its images become for its LLM, declared once.

:class:`VisualContractHooks` is the part of :class:`vlmforge.families.base.ModelFamily` that says how many visual
tokens an image gives, how many images a prompt carries, where the visual rows go and how positions are indexed
(:class:`vlmforge.specs.visual.VisualContract`); the derived budgets and the ONNX export read it from here only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, TypeAlias

from vlmforge.specs.schema import BuildSpec, ImageSize
from vlmforge.specs.visual import FamilyNumber, VisualContract, VisualPlacement

if TYPE_CHECKING:
    from collections.abc import Sequence

    import torch
    from PIL import Image

ImageFeatures: TypeAlias = "torch.Tensor | Sequence[torch.Tensor]"
"""A request's visual features: one image's [1, N, hidden], or one such tensor per image of the prompt, in order."""


class VisualContractHooks:
    """Today's families resize every image to one size and keep every default here; a family whose token count
    depends on the image's size sets :attr:`size_dependent_tokens` and :attr:`default_max_image_size` and writes
    :meth:`visual_tokens` (tiling families also :meth:`visual_engine_inputs`)."""

    name: ClassVar[str]
    default_num_visual_features: ClassVar[int]
    """Visual tokens per image when the spec's architecture does not say."""

    visual_placement: ClassVar[VisualPlacement] = VisualPlacement.PROMPT
    """Where the visual rows go: the decoder's prompt, the encoder's input, or cross-attention."""
    images_per_prompt_limit: ClassVar[int | None] = 1
    """The most images one prompt can carry (its prompt format and LLM); None: no limit of its own."""
    position_id_dims: ClassVar[int] = 1
    """Axes of the LLM's position ids (Qwen2-VL's M-RoPE: 3)."""
    size_dependent_tokens: ClassVar[bool] = False
    """The visual tokens depend on each image's size (tiles, dynamic resolution): budgets count the largest image."""
    default_max_image_size: ClassVar[ImageSize | None] = None
    """Size-dependent families: the largest image a spec is sized for unless visual.max_image_size says."""
    dynamic_spatial_axes: ClassVar[bool] = False
    """The visual module takes images of their own height and width: its ONNX export keeps both axes dynamic."""
    spatial_check_size: ClassVar[ImageSize | None] = None
    """Families with dynamic_spatial_axes: a second, non-square image size the ONNX export is traced at and checked
    against torch at (besides the golden images' own size)."""

    def num_visual_features(self, spec: BuildSpec) -> int:
        """The fixed count: architecture.num_visual_features, or the family's default."""
        return spec.architecture.num_visual_features or self.default_num_visual_features

    def visual_tokens(self, spec: BuildSpec, size: ImageSize | None) -> int:
        """Visual tokens of one image of ``size`` (None: the size every image is resized to). Fixed-count families:
        :meth:`num_visual_features` at any size."""
        return self.num_visual_features(spec)

    def visual_engine_inputs(self, spec: BuildSpec, size: ImageSize | None) -> int:
        """Visual-engine batch entries one image of ``size`` takes (tiling families: its tiles)."""
        return 1

    def visual_token_formula(self, spec: BuildSpec, size: ImageSize | None) -> str:
        """How :meth:`visual_tokens` counts at ``size``, for ``--explain`` (size-dependent families)."""
        return f"{self.name}'s token count"

    def family_numbers(self, spec: BuildSpec, size: ImageSize | None) -> tuple[FamilyNumber, ...]:
        """Numbers only this family's plan passes, at the largest image ``size`` (see VisualContract)."""
        return ()

    def visual_contract(self, spec: BuildSpec) -> VisualContract:
        """The contract at the spec's largest image: what the derived budgets are computed from."""
        size = (spec.visual.max_image_size or self.default_max_image_size) if self.size_dependent_tokens else None
        if self.size_dependent_tokens and size is None:
            raise NotImplementedError(f"{self.name}: a size-dependent family needs default_max_image_size")
        if size is not None:
            source = self.visual_token_formula(spec, size)
        elif spec.architecture.num_visual_features:
            source = "architecture.num_visual_features"
        else:
            source = f"{self.name}'s default"
        return VisualContract(
            placement=self.visual_placement, tokens_per_image=self.visual_tokens(spec, size), tokens_source=source,
            max_image_size=size, engine_inputs_per_image=self.visual_engine_inputs(spec, size),
            max_images_per_prompt=self.images_per_prompt_limit, position_id_dims=self.position_id_dims,
            dynamic_spatial_axes=self.dynamic_spatial_axes, family_numbers=self.family_numbers(spec, size))

    def image_features(self, features: ImageFeatures) -> list[torch.Tensor]:
        """A request's visual features as one [1, N_i, hidden] tensor per image (one tensor: one image), checked
        against the family's images-per-prompt limit; ValueError otherwise."""
        parts = [features] if not isinstance(features, (list, tuple)) else list(features)
        for part in parts:
            if part.dim() != 3 or part.shape[0] != 1:
                raise ValueError(f"expected the features of one image [1, N, hidden], got {tuple(part.shape)}")
        self.check_image_count(len(parts))
        return parts

    def visual_counts(self, num_visual_features: int | Sequence[int]) -> list[int]:
        """One image's token count, or one per image of a prompt, as a list checked like :meth:`image_features`."""
        counts = [num_visual_features] if isinstance(num_visual_features, int) else list(num_visual_features)
        self.check_image_count(len(counts))
        return counts

    def image_list(self, image: Image.Image | Sequence[Image.Image]) -> list[Image.Image]:
        """One image, or a prompt's images in order, as a list checked like :meth:`image_features`."""
        images = list(image) if isinstance(image, (list, tuple)) else [image]
        self.check_image_count(len(images))
        return images

    def check_image_count(self, count: int) -> None:
        """ValueError unless one prompt of this family can carry ``count`` images."""
        limit = self.images_per_prompt_limit
        if count < 1 or (limit is not None and count > limit):
            most = "one image" if limit == 1 else f"at most {limit} images" if limit else "images"
            raise ValueError(f"{self.name} takes {most} per prompt, at least one; got {count}")

