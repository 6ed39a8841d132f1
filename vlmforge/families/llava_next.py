"""LLaVA-NeXT / LLaVA-1.6 (llava-hf/llava-v1.6-*-hf): CLIP ViT-L/14-336 + MLP projector + Mistral/Vicuna, "anyres".

Each image is fitted to the best of the checkpoint's grid pinpoints (multiples of the 336-pixel tile), cut into tiles,
and encoded with a 336x336 thumbnail: the visual engine takes 1 + tiles inputs per image, and the LLM reads
576 (thumbnail) + the tile grid's patches with the padding removed + one newline embedding per grid row
(TensorRT-LLM 1.2's builder writes ``image_newlines.safetensors``). The count is transformers'
``LlavaNextProcessor._get_number_of_features`` (measured: /work/notes/families15.md); the largest is 2928 (a square
image on the 672x672 pinpoint). TensorRT-LLM's runner (``LlavaNextUtils.unpad_image``) truncates where transformers
rounds, so it never unpads to more rows than counted here: the budgets hold for it too. Plans are the 1.2 README's;
the hf toolchain does not build it yet.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vlmforge.errors import PlanError
from vlmforge.families import register_family
from vlmforge.families.release_llm import ReleaseConverterFamily
from vlmforge.plans.model import DialectInfo
from vlmforge.specs.schema import BuildSpec, ImageSize, parse_source
from vlmforge.specs.visual import FamilyNumber

TILE = 336
"""CLIP ViT-L/14-336's input: tiles and thumbnail."""
PATCH = 14
TILE_PATCHES = TILE // PATCH  # 24
BASE_TOKENS = TILE_PATCHES * TILE_PATCHES  # 576: the thumbnail's patches (CLS dropped by the "default" strategy)
DEFAULT_PINPOINTS: tuple[tuple[int, int], ...] = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
"""image_grid_pinpoints of every llava-v1.6 checkpoint, (height, width); TensorRT-LLM 1.2's runner hard-codes them."""

RUNNER_TEMPLATES = ("mistralai/Mistral-7B-Instruct-v0.2", "NousResearch/Nous-Hermes-2-Yi-34B")
"""Language models (text_config._name_or_path) whose prompt template TensorRT-LLM 1.2's multimodal runner has for
llava_next; any other raises "Prompt template for ... not included" in run.py."""
TEXT_MODELS = {
    "llava-hf/llava-v1.6-mistral-7b-hf": "mistralai/Mistral-7B-Instruct-v0.2",
    "llava-hf/llava-v1.6-vicuna-7b-hf": "lmsys/vicuna-7b-v1.5",
    "llava-hf/llava-v1.6-vicuna-13b-hf": "lmsys/vicuna-13b-v1.5",
    "llava-hf/llava-v1.6-34b-hf": "NousResearch/Nous-Hermes-2-Yi-34B",
}
"""The published checkpoints' text_config._name_or_path."""


@dataclass(frozen=True)
class AnyresCount:
    """One image's anyres numbers."""

    pinpoint: tuple[int, int]
    """The chosen resolution (height, width)."""
    rows: int
    """Grid rows after unpadding (= newline tokens)."""
    cols: int
    tokens: int
    tiles: int
    """Visual-engine inputs: the pinpoint's tiles plus the thumbnail."""


def select_best_resolution(height: int, width: int, pinpoints: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    """transformers' ``select_best_resolution``: most effective pixels, then least waste; first wins a tie."""
    best, best_effective, best_waste = pinpoints[0], 0, float("inf")
    for pin_h, pin_w in pinpoints:
        scale = min(pin_w / width, pin_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        waste = pin_w * pin_h - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (pin_h, pin_w), effective, waste
    return best


def anyres_count(height: int, width: int, pinpoints: tuple[tuple[int, int], ...] = DEFAULT_PINPOINTS) -> AnyresCount:
    """Visual tokens and engine inputs of one height x width image (``LlavaNextProcessor._get_number_of_features``
    with the "default" feature strategy)."""
    pin_h, pin_w = select_best_resolution(height, width, pinpoints)
    rows, cols = TILE_PATCHES * (pin_h // TILE), TILE_PATCHES * (pin_w // TILE)
    if width / height > cols / rows:
        new_rows = int(round(height * (cols / width), 7))
        rows -= 2 * ((rows - new_rows) // 2)
    else:
        new_cols = int(round(width * (rows / height), 7))
        cols -= 2 * ((cols - new_cols) // 2)
    tiles = (pin_h // TILE) * (pin_w // TILE) + 1
    return AnyresCount((pin_h, pin_w), rows, cols, BASE_TOKENS + rows * cols + rows, tiles)


def _candidates(size: ImageSize, pinpoints: tuple[tuple[int, int], ...]) -> set[tuple[int, int]]:
    """Images within ``size`` where the maxima lie: the box itself, its largest square, and for each pinpoint the
    largest image of its aspect ratio (a pixel either way); tests/families check this against every image size."""
    box_h, box_w = size.height, size.width
    side = min(box_h, box_w)
    found = {(box_h, box_w), (side, side)}
    for pin_h, pin_w in pinpoints:
        scale = min(box_h / pin_h, box_w / pin_w)
        h, w = int(pin_h * scale), int(pin_w * scale)
        for dh in (-1, 0, 1):
            for dw in (-1, 0, 1):
                if 1 <= h + dh <= box_h and 1 <= w + dw <= box_w:
                    found.add((h + dh, w + dw))
    return found


def largest_counts(size: ImageSize, pinpoints: tuple[tuple[int, int], ...] = DEFAULT_PINPOINTS
                   ) -> tuple[AnyresCount, AnyresCount]:
    """(the image within ``size`` with the most tokens, the one with the most engine inputs)."""
    counts = [anyres_count(h, w, pinpoints) for h, w in sorted(_candidates(size, pinpoints))]
    return max(counts, key=lambda c: c.tokens), max(counts, key=lambda c: c.tiles)


@register_family
class LlavaNextFamily(ReleaseConverterFamily):
    """LLaVA-NeXT: anyres tiles + newline embeddings, LLaMA/Mistral LLM (TensorRT-LLM's llama converter)."""

    name: ClassVar[str] = "llava_next"
    description: ClassVar[str] = "LLaVA-NeXT / v1.6 (llava-hf/llava-v1.6-*-hf), CLIP anyres tiles + Mistral/Vicuna"
    builder_model_type: ClassVar[str] = "llava_next"
    hf_class: ClassVar[str] = "LlavaNextForConditionalGeneration"
    default_num_visual_features: ClassVar[int] = 2928
    llm_kind: ClassVar[str] = "llama"
    fused_mlp_default: ClassVar[bool] = True
    supports_fused_mlp: ClassVar[bool] = True
    size_dependent_tokens: ClassVar[bool] = True
    default_max_image_size: ClassVar[ImageSize | None] = ImageSize(height=672, width=672)
    """The largest pinpoint: every larger image is scaled down onto a pinpoint, so no image gives more tokens."""
    images_per_prompt_limit: ClassVar[int | None] = None

    def visual_tokens(self, spec: BuildSpec, size: ImageSize | None) -> int:
        assert size is not None
        return largest_counts(size)[0].tokens

    def visual_engine_inputs(self, spec: BuildSpec, size: ImageSize | None) -> int:
        assert size is not None
        return largest_counts(size)[1].tiles

    def visual_token_formula(self, spec: BuildSpec, size: ImageSize | None) -> str:
        assert size is not None
        top = largest_counts(size)[0]
        return (f"llava_next anyres, most tokens for an image of {top.pinpoint[0]}x{top.pinpoint[1]}'s shape: "
                f"{BASE_TOKENS} thumbnail + {top.rows}x{top.cols} unpadded grid + {top.rows} newlines")

    def visual_numbers(self, spec: BuildSpec, size: ImageSize | None) -> tuple[FamilyNumber, ...]:
        assert size is not None
        tiles = largest_counts(size)[1]
        pin_h, pin_w = tiles.pinpoint
        return (FamilyNumber(
            "visual_inputs_per_image", tiles.tiles,
            f"1 thumbnail + {pin_h // TILE}x{pin_w // TILE} tiles of the {pin_h}x{pin_w} pinpoint",
            "visual-engine batch entries one image takes (each 3x336x336)"),)

    def check_dialect(self, spec: BuildSpec, info: DialectInfo) -> None:
        super().check_dialect(spec, info)
        parsed = parse_source(spec.source)
        text_model = TEXT_MODELS.get(parsed.location) if parsed.scheme == "hf" else None
        if text_model is not None and text_model not in RUNNER_TEMPLATES:
            raise PlanError(
                f"{spec.source}: TensorRT-LLM {info.release}'s multimodal runner (run.py, the plan's validate step) "
                "has "
                f"llava_next prompt templates only for {' and '.join(RUNNER_TEMPLATES)}; this checkpoint's language "
                f"model is {text_model}, so run.py stops with 'Prompt template for {text_model} ... not included'. "
                "Build llava-v1.6-mistral-7b-hf (or llava-v1.6-34b-hf) with this release, or wait for the hf toolchain")
