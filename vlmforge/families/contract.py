"""The visual contract of a model family: what its images become for its LLM, declared once.

:class:`VisualContractHooks` is the part of :class:`vlmforge.families.base.ModelFamily` that says how many visual
tokens an image gives, how many images a prompt carries, where the visual rows go and how positions are indexed
(:class:`vlmforge.specs.visual.VisualContract`); the derived budgets and the ONNX export read it from here only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeAlias

from vlmforge.specs.schema import BuildSpec, ImageSize
from vlmforge.specs.visual import FamilyNumber, VisualContract, VisualPlacement

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

    import torch
    from PIL import Image

ImageFeatures: TypeAlias = "torch.Tensor | Sequence[torch.Tensor]"
"""A request's visual features: one image's [1, N, hidden], or one such tensor per image of the prompt, in order."""


@dataclass
class VisualInputs:
    """Images as the visual engine takes them: ``pixels`` [T, 3, H, W], where image i takes ``inputs_per_image[i]``
    consecutive entries (1 for resize-to-one-size families, 1 + tiles for anyres ones), and each image's
    ``image_sizes[i]`` = (height, width) before preprocessing (what anyres unpadding needs)."""

    pixels: torch.Tensor
    inputs_per_image: list[int]
    image_sizes: list[tuple[int, int]]
    grids: list[tuple[int, int, int]] | None = None
    """Dynamic-resolution families (Qwen2-VL): each image's (t, h, w) patch grid, ``pixels`` holding t*h*w rows."""
    output_rows: list[int] | None = None
    """Visual-engine output rows of each image where they differ from ``inputs_per_image`` (Qwen2-VL's 2x2 merge)."""

    def __post_init__(self) -> None:
        if sum(self.inputs_per_image) != self.pixels.shape[0] or len(self.inputs_per_image) != len(self.image_sizes):
            raise ValueError(f"{len(self.image_sizes)} images taking {self.inputs_per_image} visual-engine inputs do "
                             f"not add up to the {self.pixels.shape[0]} rows of pixels")

    def split(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """``rows`` (one per engine input, e.g. the engine's output) cut into each image's part, in order."""
        return list(rows.split(self.inputs_per_image))

    def split_outputs(self, outputs: torch.Tensor) -> list[torch.Tensor]:
        """The visual engine's ``outputs`` cut into each image's part, in order."""
        return list(outputs.split(self.output_rows if self.output_rows is not None else self.inputs_per_image))

    def select(self, indices: Sequence[int]) -> VisualInputs:
        """The inputs of the images at ``indices`` (in that order)."""
        import torch

        parts = self.split(self.pixels)
        pick = (lambda values: None if values is None else [values[i] for i in indices])  # noqa: E731
        return VisualInputs(torch.cat([parts[i] for i in indices]), [self.inputs_per_image[i] for i in indices],
                            [self.image_sizes[i] for i in indices], pick(self.grids), pick(self.output_rows))


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
    resized_to_one_size: ClassVar[bool] = True
    """A fixed-count family's images all become one size (False: the fixed count is the most any image gives, e.g.
    InternVL's tiles, budgeted at their maximum)."""
    size_dependent_tokens: ClassVar[bool] = False
    """The visual tokens depend on each image's size (tiles, dynamic resolution): budgets count the largest image."""
    default_max_image_size: ClassVar[ImageSize | None] = None
    """Size-dependent families: the largest image a spec is sized for unless visual.max_image_size says."""
    dynamic_spatial_axes: ClassVar[bool] = False
    """The visual module takes images of their own height and width: its ONNX export keeps both axes dynamic."""
    visual_engine_axes: ClassVar[dict[str, dict[int, str]]] = {}
    """A visual engine of several inputs (fed by :meth:`visual_engine_feeds`): the dynamic axes of each input and of
    the output ``features`` by name ({} for the one-input engines: dynamic batch, and the spatial axes above)."""
    spatial_check_size: ClassVar[ImageSize | None] = None
    """Families with dynamic_spatial_axes: a second, non-square image size the ONNX export is traced at and checked
    against torch at (besides the golden images' own size)."""
    prompt_in_image: ClassVar[bool] = False
    """Some checkpoints of the family render the request's text into its image (Pix2Struct VQA, DePlot: a header
    above the image), so an image's visual input depends on its request's prompt: the runner computes it from both
    (:meth:`image_header`, :meth:`headed_visual_inputs`) and keys its image cache on both."""

    # --- the visual path around the visual engine (the runner and the hf stages call these) ------------------

    def golden_images(self) -> list[Image.Image]:
        """The images validation and the visual engine's check run on (the three golden images; a size-dependent
        family gives them several sizes)."""
        from vlmforge.modeling.images import synthetic_images

        return synthetic_images()

    def visual_inputs(self, processor: Any, images: Sequence[Image.Image]) -> VisualInputs:
        """The visual engine's inputs for ``images``: :meth:`pixel_values`, one entry per image."""
        pixels = self.pixel_values(processor, list(images))  # type: ignore[attr-defined]  # ModelFamily's
        return VisualInputs(pixels, [1] * len(images), [(image.height, image.width) for image in images])

    def prompt_visual_inputs(self, processor: Any, images: Sequence[Image.Image],
                             images_in_prompt: Sequence[int] | None = None) -> VisualInputs:
        """:meth:`visual_inputs` where the preprocessing may depend on how many images each image's prompt carries
        (``images_in_prompt[i]``, None: every image alone). LLaVA-OneVision tiles an image alone but gives each of a
        prompt's several images one padded tile; every other family preprocesses an image the same either way."""
        if images_in_prompt is not None and len(images_in_prompt) != len(images):
            raise ValueError(f"images_in_prompt has {len(images_in_prompt)} entries for {len(images)} images")
        return self.visual_inputs(processor, images)

    def image_header(self, processor: Any, prompt: str | None) -> str | None:
        """The text a checkpoint (``processor``) renders into a request's images for its ``prompt``; None where its
        images are encoded apart from prompts (every family without :attr:`prompt_in_image`)."""
        return None

    def headed_visual_inputs(self, processor: Any, images: Sequence[Image.Image],
                             headers: Sequence[str]) -> VisualInputs:
        """:meth:`visual_inputs` of images each rendered with its header (:attr:`prompt_in_image` families)."""
        raise NotImplementedError(f"{self.name} renders no prompt into its images (prompt_in_image is False)")

    def check_checkpoint_config(self, spec: BuildSpec, config: dict[str, Any]) -> None:
        """Refuse (SpecError) a checkpoint whose config.json disagrees with what the spec's budgets were counted
        from (size-dependent families; fixed-count ones are checked through architecture facts)."""

    def load_visual_extras(self, vision_dir: Path) -> dict[str, torch.Tensor]:
        """Tensors the visual path needs beside the visual engine, read from its directory (none by default)."""
        return {}

    def save_visual_extras(self, model: Any, vision_dir: Path) -> None:
        """Write what :meth:`load_visual_extras` reads, from the reference model (nothing by default)."""

    def visual_engine_feeds(self, inputs: VisualInputs, max_batch_size: int,
                            extras: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]] | None:
        """The visual engine's calls for ``inputs``, each a feed by ONNX input name, whose outputs concatenated are
        every image's outputs in order (cut by :meth:`VisualInputs.split_outputs`). None (every family with one
        engine input): ``pixels`` in chunks of ``max_batch_size`` entries. Qwen2-VL feeds rows, rope and mask."""
        return None

    def visual_outputs(self, module: torch.nn.Module, inputs: VisualInputs) -> torch.Tensor:
        """The torch visual module (:meth:`visual_module`) run on ``inputs`` as the visual engine is: ``module(pixels)``
        (several-input families: on their feeds, outputs concatenated)."""
        return module(inputs.pixels)

    def pack_visual_features(self, processor: Any, outputs: torch.Tensor, image_size: tuple[int, int],
                             extras: dict[str, torch.Tensor]) -> torch.Tensor:
        """One image's visual features [1, N, hidden] from its visual-engine outputs [inputs, P, hidden] (one entry
        per engine input; by default one, already the features)."""
        if outputs.shape[0] != 1:
            raise ValueError(f"{self.name} expects one visual-engine output per image, got {outputs.shape[0]}")
        return outputs

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

