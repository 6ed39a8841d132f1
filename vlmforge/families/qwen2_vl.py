"""Qwen2-VL (Qwen/Qwen2-VL-2B-Instruct, -7B-Instruct): dynamic resolution, 2x2 patch merge, M-RoPE positions.

Each image keeps (about) its own size: ``smart_resize`` rounds height and width to multiples of 28 (14-pixel patches,
merged 2x2) within [min_pixels, max_pixels]; the vision tower reads (h/14)(w/14) patch rows and the LLM
(h/14)(w/14)/4 tokens. TensorRT-LLM 1.2's visual engine takes the rows of every image of a call concatenated: its
profile holds min_hw_dims to max_hw_dims x max_batch_size rows, so the plan sizes --max_hw_dims to the rows of the
spec's largest image and --min_hw_dims to the smallest image the processor makes. Positions are M-RoPE (time, height,
width); the release's qwen converter reads that from the checkpoint's config (no flag). Plans are the 1.2 README's.
"""

from __future__ import annotations

import math
from typing import ClassVar

from vlmforge.errors import PlanError, SpecError
from vlmforge.families import register_family
from vlmforge.families.release_llm import ReleaseConverterFamily
from vlmforge.plans.model import DialectInfo, PlanContext, Step
from vlmforge.specs.schema import BuildSpec, ImageSize
from vlmforge.specs.visual import FamilyNumber

PATCH = 14
MERGE = 2
FACTOR = PATCH * MERGE  # 28
MIN_PIXELS = 56 * 56  # 3136: preprocessor_config.json of both Instruct checkpoints
MAX_PIXELS = 28 * 28 * 16384  # 12845056: idem
MAX_ASPECT_RATIO = 200
ROWS_PER_TOKEN = MERGE * MERGE
RUNNER_IMAGE = ImageSize(height=504, width=504)
"""What TensorRT-LLM 1.2's run.py resizes every qwen2_vl image to."""
RUNNER_IMAGE_TOKENS = 324
REQUIREMENTS = "requirements-qwen2vl.txt"
"""The 1.2 README's first step: accelerate, qwen-vl-utils 0.0.8 and transformers 4.51.0 (nvbugs/5385987) for the qwen
converter and the visual builder."""


def smart_resize(height: int, width: int, min_pixels: int = MIN_PIXELS,
                 max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """transformers' Qwen2-VL ``smart_resize``: the (height, width) an image is resized to, multiples of 28 within
    [min_pixels, max_pixels]; ValueError for an aspect ratio over 200."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"Qwen2-VL takes images of aspect ratio at most {MAX_ASPECT_RATIO}, got {height}x{width}")
    h_bar, w_bar = round(height / FACTOR) * FACTOR, round(width / FACTOR) * FACTOR
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(FACTOR, math.floor(height / beta / FACTOR) * FACTOR)
        w_bar = max(FACTOR, math.floor(width / beta / FACTOR) * FACTOR)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / FACTOR) * FACTOR
        w_bar = math.ceil(width * beta / FACTOR) * FACTOR
    return h_bar, w_bar


def image_tokens(height: int, width: int, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS) -> int:
    """LLM tokens of one image: (h/14)(w/14)/4 at its smart_resize size (the processor's image_grid_thw product / 4)."""
    h_bar, w_bar = smart_resize(height, width, min_pixels, max_pixels)
    return (h_bar // PATCH) * (w_bar // PATCH) // ROWS_PER_TOKEN


def largest_tokens(size: ImageSize, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS) -> tuple[int, str]:
    """The most tokens an image within ``size`` gives, and how: the box's own count (rounding is monotone), or
    max_pixels / 784 once the box is resized down (no image gives more)."""
    h_bar = round(size.height / FACTOR) * FACTOR
    w_bar = round(size.width / FACTOR) * FACTOR
    if h_bar * w_bar > max_pixels:
        return max_pixels // (FACTOR * FACTOR), f"qwen2_vl: max_pixels / 28^2 = {max_pixels} / 784 (the resize cap)"
    if h_bar * w_bar < min_pixels:
        try:
            h_bar, w_bar = smart_resize(size.height, size.width, min_pixels, max_pixels)
        except ValueError as error:
            raise SpecError(f"visual.max_image_size {size}: {error}; give the largest image the engine must take",
                            path="visual.max_image_size") from None
    tokens = (h_bar // PATCH) * (w_bar // PATCH) // ROWS_PER_TOKEN
    return tokens, (f"qwen2_vl smart_resize to {h_bar}x{w_bar} (multiples of 28): "
                    f"({h_bar}/14) x ({w_bar}/14) / 4 = {tokens}")


@register_family
class Qwen2VlFamily(ReleaseConverterFamily):
    """Qwen2-VL: dynamic-resolution ViT with 2x2 merge + Qwen2 LLM with M-RoPE (TensorRT-LLM's qwen converter)."""

    name: ClassVar[str] = "qwen2_vl"
    description: ClassVar[str] = "Qwen2-VL (Qwen/Qwen2-VL-*-Instruct), dynamic resolution, M-RoPE"
    builder_model_type: ClassVar[str] = "qwen2_vl"
    hf_class: ClassVar[str] = "Qwen2VLForConditionalGeneration"
    default_num_visual_features: ClassVar[int] = 324
    llm_kind: ClassVar[str] = "qwen"
    supports_fused_mlp: ClassVar[bool] = True  # gated MLP; the README's build leaves it off
    size_dependent_tokens: ClassVar[bool] = True
    default_max_image_size: ClassVar[ImageSize | None] = ImageSize(height=504, width=504)
    """What 1.2's run.py resizes every image to (324 tokens) and its README sizes --max_multimodal_len for."""
    images_per_prompt_limit: ClassVar[int | None] = None
    position_id_dims: ClassVar[int] = 3
    dynamic_spatial_axes: ClassVar[bool] = True

    def visual_tokens(self, spec: BuildSpec, size: ImageSize | None) -> int:
        assert size is not None
        return largest_tokens(size)[0]

    def visual_token_formula(self, spec: BuildSpec, size: ImageSize | None) -> str:
        assert size is not None
        return largest_tokens(size)[1]

    def visual_numbers(self, spec: BuildSpec, size: ImageSize | None) -> tuple[FamilyNumber, ...]:
        assert size is not None
        tokens = largest_tokens(size)[0]
        return (
            FamilyNumber("max_hw_dims", tokens * ROWS_PER_TOKEN, f"patch rows of the largest image = 4 x {tokens} "
                         "tokens (before the 2x2 merge)", "build_multimodal_engine.py --max_hw_dims: the visual "
                         "engine takes up to max_hw_dims x visual_max_batch_size rows per call"),
            FamilyNumber("min_hw_dims", MIN_PIXELS // (PATCH * PATCH), f"patch rows of the smallest image = min_pixels "
                         f"/ 14^2 = {MIN_PIXELS} / 196", "build_multimodal_engine.py --min_hw_dims (its default 128 "
                         "would refuse one image under 128 rows, e.g. 112x112)"),
        )

    def check_dialect(self, spec: BuildSpec, info: DialectInfo) -> None:
        """1.2's run.py (the plan's validate step) resizes every image to 504x504: the engines must take that image."""
        super().check_dialect(spec, info)
        size = spec.visual.max_image_size or self.default_max_image_size
        assert size is not None
        tokens = largest_tokens(size)[0]
        if tokens < RUNNER_IMAGE_TOKENS:
            raise PlanError(
                f"visual.max_image_size {size} gives at most {tokens} tokens per image, but TensorRT-LLM "
                f"{info.release}'s run.py (the plan's validate step) resizes every image to {RUNNER_IMAGE} "
                f"({RUNNER_IMAGE_TOKENS} tokens, {RUNNER_IMAGE_TOKENS * ROWS_PER_TOKEN} patch rows), which the engines "
                f"would refuse; set visual.max_image_size to {RUNNER_IMAGE} or more")

    def visual_extra_args(self, ctx: PlanContext) -> list[str]:
        numbers = {number.name: number.value for number in self.visual_contract(ctx.spec).family_numbers}
        return ["--min_hw_dims", str(numbers["min_hw_dims"]), "--max_hw_dims", str(numbers["max_hw_dims"])]

    def fetch_steps(self, ctx: PlanContext) -> list[Step]:
        """The checkpoint, then the README's requirements (the converter and builder need transformers 4.51)."""
        install = ctx.step("install-requirements", ["pip", "install", "-r", REQUIREMENTS], tool="pip")
        return super().fetch_steps(ctx) + [install]
