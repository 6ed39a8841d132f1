"""LLaVA-NeXT / LLaVA-1.6 (llava-hf/llava-v1.6-*-hf): CLIP ViT-L/14-336 + MLP projector + Mistral/Vicuna, "anyres".

Each image is fitted to the best of the checkpoint's grid pinpoints (multiples of the 336-pixel tile), cut into tiles,
and encoded with a 336x336 thumbnail: the visual engine takes 1 + tiles inputs per image, and the LLM reads
576 (thumbnail) + the tile grid's patches with the padding removed + one newline embedding per grid row
(TensorRT-LLM 1.2's builder writes ``image_newlines.safetensors``). The count is transformers'
``LlavaNextProcessor._get_number_of_features`` (measured: /work/notes/families15.md); the largest is 2928 (a square
image on the 672x672 pinpoint). TensorRT-LLM's runner (``LlavaNextUtils.unpad_image``) truncates where transformers
rounds, so it never unpads to more rows than counted here: the budgets hold for it too. Plans are the 1.2 README's.

hf toolchain: the visual engine is CLIP + projector on tiles ([tiles, 3, S, S] -> [tiles, (S/14)^2, hidden], a dynamic
tile axis); the anyres preprocessing (each image's own tiles and size) and the packing (transformers'
``pack_image_features``: unpadding and one ``image_newline`` per grid row) are done here in torch, so each image gives
its own number of tokens, spliced in at its ``<image>``. ``image_newline`` lives beside the ONNX file in
``image_newlines.safetensors`` (1.2's file name and key). The budgets of the tiny model (``tiny://llava-next``, 28-pixel
tiles) are counted from its own geometry (:func:`geometry_of`); convert refuses a checkpoint whose config disagrees.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from vlmforge.errors import PlanError, SpecError
from vlmforge.families import register_family
from vlmforge.families.llava import LlavaFamily
from vlmforge.families.release_llm import ReleaseConverterFamily
from vlmforge.plans.model import DialectInfo
from vlmforge.specs.schema import BuildSpec, ImageSize, parse_source
from vlmforge.specs.visual import FamilyNumber

if TYPE_CHECKING:
    from collections.abc import Sequence

    import torch
    from PIL import Image

    from vlmforge.families.contract import VisualInputs

TILE = 336
"""CLIP ViT-L/14-336's input: tiles and thumbnail."""
PATCH = 14
TILE_PATCHES = TILE // PATCH  # 24
BASE_TOKENS = TILE_PATCHES * TILE_PATCHES  # 576: the thumbnail's patches (CLS dropped by the "default" strategy)
DEFAULT_PINPOINTS: tuple[tuple[int, int], ...] = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
"""image_grid_pinpoints of every llava-v1.6 checkpoint, (height, width); TensorRT-LLM 1.2's runner hard-codes them."""



@dataclass(frozen=True)
class AnyresGeometry:
    """What anyres counts from: the tower's tile side, its patch side and the grid pinpoints (height, width)."""

    tile: int
    patch: int
    pinpoints: tuple[tuple[int, int], ...]


LLAVA_V16 = AnyresGeometry(TILE, PATCH, DEFAULT_PINPOINTS)
TINY_SOURCE = "tiny://llava-next"
TINY = AnyresGeometry(28, 14, ((28, 56), (56, 28), (56, 56), (84, 28), (28, 84)))
"""tiny://llava-next: 2x2 patches per 28-pixel tile, llava-v1.6's pinpoints scaled by 1/12 (at most 1 + 4 tiles and
4 + 4x4 + 4 = 24 tokens per image: CPU-cheap)."""
NEWLINES_FILE = "image_newlines.safetensors"
NEWLINE_KEY = "image_newline"
PROMPT_TEMPLATE = "[INST] {images}{text} [/INST]"
"""llava-v1.6-mistral's format (its model card and chat template), ``<image>\n`` per image."""


def geometry_of(spec: BuildSpec) -> AnyresGeometry:
    """The anyres geometry a spec's budgets are counted with: the tiny model's, or llava-v1.6's (every published
    checkpoint; convert checks the checkpoint's config against it)."""
    return TINY if spec.source == TINY_SOURCE else LLAVA_V16


def config_geometry(config: dict[str, Any]) -> tuple[AnyresGeometry, str]:
    """(The geometry, the feature-select strategy) a LLaVA-NeXT config.json declares."""
    vision = config.get("vision_config") or {}
    pins = tuple((int(h), int(w)) for h, w in config.get("image_grid_pinpoints") or DEFAULT_PINPOINTS)
    return (AnyresGeometry(int(vision.get("image_size", TILE)), int(vision.get("patch_size", PATCH)), pins),
            str(config.get("vision_feature_select_strategy", "default")))


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


def anyres_count(height: int, width: int, pinpoints: tuple[tuple[int, int], ...] = DEFAULT_PINPOINTS,
                 tile: int = TILE, patch: int = PATCH) -> AnyresCount:
    """Visual tokens and engine inputs of one height x width image (``LlavaNextProcessor._get_number_of_features``
    with the "default" feature strategy)."""
    side = tile // patch
    pin_h, pin_w = select_best_resolution(height, width, pinpoints)
    rows, cols = side * (pin_h // tile), side * (pin_w // tile)
    if width / height > cols / rows:
        new_rows = int(round(height * (cols / width), 7))
        rows -= 2 * ((rows - new_rows) // 2)
    else:
        new_cols = int(round(width * (rows / height), 7))
        cols -= 2 * ((cols - new_cols) // 2)
    tiles = (pin_h // tile) * (pin_w // tile) + 1
    return AnyresCount((pin_h, pin_w), rows, cols, side * side + rows * cols + rows, tiles)


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


def largest_counts(size: ImageSize, pinpoints: tuple[tuple[int, int], ...] = DEFAULT_PINPOINTS,
                   tile: int = TILE, patch: int = PATCH) -> tuple[AnyresCount, AnyresCount]:
    """(the image within ``size`` with the most tokens, the one with the most engine inputs)."""
    counts = [anyres_count(h, w, pinpoints, tile, patch) for h, w in sorted(_candidates(size, pinpoints))]
    return max(counts, key=lambda c: c.tokens), max(counts, key=lambda c: c.tiles)


def spec_counts(spec: BuildSpec, size: ImageSize) -> tuple[AnyresCount, AnyresCount]:
    geometry = geometry_of(spec)
    return largest_counts(size, geometry.pinpoints, geometry.tile, geometry.patch)


@register_family
class LlavaNextFamily(ReleaseConverterFamily, LlavaFamily):
    """LLaVA-NeXT: anyres tiles + newline embeddings, LLaMA/Mistral LLM (TensorRT-LLM's llama converter). The hf
    hooks it shares with LLaVA-1.5 (the prompt's ``<image>`` expansion and splice) come from :class:`LlavaFamily`."""

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
    hf_supported: ClassVar[bool] = True
    hf_unsupported_reason: ClassVar[str] = ""
    tiny_source: ClassVar[str | None] = TINY_SOURCE
    quantizable: ClassVar[bool] = True
    visual_weight_prefixes: ClassVar[tuple[str, ...]] = LlavaFamily.visual_weight_prefixes + (
        "image_newline", "model.image_newline")

    def visual_tokens(self, spec: BuildSpec, size: ImageSize | None) -> int:
        assert size is not None
        return spec_counts(spec, size)[0].tokens

    def visual_engine_inputs(self, spec: BuildSpec, size: ImageSize | None) -> int:
        assert size is not None
        return spec_counts(spec, size)[1].tiles

    def visual_token_formula(self, spec: BuildSpec, size: ImageSize | None) -> str:
        assert size is not None
        top = spec_counts(spec, size)[0]
        side = geometry_of(spec).tile // geometry_of(spec).patch
        return (f"llava_next anyres, most tokens for an image of {top.pinpoint[0]}x{top.pinpoint[1]}'s shape: "
                f"{side * side} thumbnail + {top.rows}x{top.cols} unpadded grid + {top.rows} newlines")

    def visual_numbers(self, spec: BuildSpec, size: ImageSize | None) -> tuple[FamilyNumber, ...]:
        assert size is not None
        tiles = spec_counts(spec, size)[1]
        pin_h, pin_w = tiles.pinpoint
        tile = geometry_of(spec).tile
        return (FamilyNumber(
            "visual_inputs_per_image", tiles.tiles,
            f"1 thumbnail + {pin_h // tile}x{pin_w // tile} tiles of the {pin_h}x{pin_w} pinpoint",
            f"visual-engine batch entries one image takes (each 3x{tile}x{tile})"),)

    def visual_model_type(self, ctx: Any) -> str:
        return self.builder_model_type

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

    # --- hf toolchain -----------------------------------------------------------------------

    def make_tiny(self, out_dir: Path, seed: int = 0) -> None:
        from transformers import LlavaNextForConditionalGeneration

        from vlmforge.modeling.devices import seed_all

        seed_all(seed)
        LlavaNextForConditionalGeneration(_tiny_config()).eval().save_pretrained(out_dir)
        _tiny_processor().save_pretrained(out_dir)

    def hf_model_class(self) -> type:
        from transformers import LlavaNextForConditionalGeneration

        return LlavaNextForConditionalGeneration

    def architecture_facts(self, config: dict[str, Any]) -> Any:
        """The most tokens one image gives (at the config's largest pinpoint) and the LLM's attention heads."""
        from vlmforge.families.base import ArchitectureFacts

        geometry, _ = config_geometry(config)
        side = max(max(pin) for pin in geometry.pinpoints)
        top = largest_counts(ImageSize(height=side, width=side), geometry.pinpoints, geometry.tile, geometry.patch)[0]
        heads = (config.get("text_config") or {}).get("num_attention_heads", 32)
        return ArchitectureFacts(top.tokens, int(heads))

    def check_checkpoint_config(self, spec: BuildSpec, config: dict[str, Any]) -> None:
        """The checkpoint must tile the way the spec's budgets were counted (tile, patch, pinpoints, "default")."""
        geometry, strategy = config_geometry(config)
        wanted = geometry_of(spec)
        if strategy != "default":
            raise SpecError(f"{spec.source}: vision_feature_select_strategy {strategy!r}; vlmforge counts llava_next "
                            "tokens for 'default' (CLS dropped), the strategy of every llava-v1.6 checkpoint",
                            path="source")
        if geometry != wanted:
            raise SpecError(f"{spec.source}'s config.json tiles with {geometry}, but the budgets were counted with "
                            f"{wanted}: vlmforge sizes llava_next for llava-v1.6's geometry (and {TINY_SOURCE}'s)",
                            path="source")

    def format_prompt(self, text: str | None, num_images: int = 1) -> str | None:
        """``[INST] <image>\\n{text} [/INST]`` (one ``<image>\\n`` per image); text holding ``<image>`` is kept."""
        from vlmforge.families.llava import DEFAULT_USER_TEXT, IMAGE_TOKEN

        self.check_image_count(num_images)
        text = DEFAULT_USER_TEXT if text is None else text
        if IMAGE_TOKEN in text:
            return text
        return PROMPT_TEMPLATE.format(images=(IMAGE_TOKEN + "\n") * num_images, text=text)

    def golden_images(self) -> list[Image.Image]:
        """The three golden images at three sizes (5, 4 and 4 tiles for the tiny model): square, wide and tall."""
        from vlmforge.modeling.images import synthetic_images

        square, wide, tall = synthetic_images()
        return [square, wide.resize((90, 40)), tall.resize((40, 90))]

    def visual_inputs(self, processor: Any, images: Sequence[Image.Image]) -> VisualInputs:
        """Each image's own tiles (thumbnail first, as the image processor orders them), not padded to the batch's
        most: the processor pads a batch's pixel_values to its largest tile count, the engine takes only real tiles."""
        import torch

        from vlmforge.families.contract import VisualInputs

        parts = [processor.image_processor(images=[image], return_tensors="pt")["pixel_values"][0].to(torch.float32)
                 for image in images]
        return VisualInputs(torch.cat(parts), [int(part.shape[0]) for part in parts],
                            [(image.height, image.width) for image in images])

    def pixel_values(self, processor: Any, images: list[Image.Image]) -> torch.Tensor:
        """Every image's tiles, concatenated [tiles, 3, S, S]."""
        return self.visual_inputs(processor, images).pixels

    def save_visual_extras(self, model: Any, vision_dir: Path) -> None:
        """``image_newlines.safetensors`` (key ``image_newline``), as TensorRT-LLM 1.2's builder writes it."""
        from safetensors.torch import save_file

        newline = model.model.image_newline.detach().to("cpu").float().contiguous()
        save_file({NEWLINE_KEY: newline}, str(Path(vision_dir) / NEWLINES_FILE))

    def load_visual_extras(self, vision_dir: Path) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        path = Path(vision_dir) / NEWLINES_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: a {self.name} visual engine needs its newline embedding beside it "
                                    "(the hf toolchain's visual stage writes it): rebuild the engine")
        return {NEWLINE_KEY: load_file(str(path))[NEWLINE_KEY]}

    def pack_visual_features(self, processor: Any, outputs: torch.Tensor, image_size: tuple[int, int],
                             extras: dict[str, torch.Tensor]) -> torch.Tensor:
        """transformers' ``pack_image_features`` for one image: thumbnail rows, then the tile grid's rows unpadded to
        the image's aspect ratio, one newline embedding after each grid row. [tiles, P, hidden] -> [1, N, hidden]."""
        import torch
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

        image_processor = processor.image_processor
        tile, side = self.tile_geometry(processor)
        newline = extras[NEWLINE_KEY].to(outputs.device, outputs.dtype)
        base, tiles = outputs[0], outputs[1:]
        if tiles.shape[0] == 0:
            return torch.cat([base, newline[None]])[None]
        size = torch.tensor(image_size)
        pinpoints = [list(pin) for pin in image_processor.image_grid_pinpoints]
        grid_h, grid_w = get_anyres_image_grid_shape(size, pinpoints, tile)
        grid = tiles.view(grid_h, grid_w, side, side, -1).permute(4, 0, 2, 1, 3).contiguous()
        grid = self.resize_grid(unpad_image(grid.flatten(1, 2).flatten(2, 3), size), side)
        grid = torch.cat([grid, newline[:, None, None].expand(*grid.shape[:-1], 1)], dim=-1)
        return torch.cat([base, grid.flatten(1, 2).transpose(0, 1)])[None]

    def tile_geometry(self, processor: Any) -> tuple[int, int]:
        """(tile side in pixels, patches per tile side) of the processor's anyres tiles."""
        tile = int(processor.image_processor.crop_size["height"])
        return tile, tile // int(processor.patch_size)

    def resize_grid(self, grid: torch.Tensor, side: int) -> torch.Tensor:
        """The unpadded feature grid [hidden, rows, cols] as the LLM reads it: as it is here (LLaVA-OneVision
        downsamples a large one)."""
        return grid

    def causal_lm_class(self, text_config: Any) -> type:
        """The LLM class of the checkpoint's text config: LLaMA for Vicuna and the tiny model, Mistral for
        v1.6-mistral."""
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        return MODEL_FOR_CAUSAL_LM_MAPPING[type(text_config)]

    def llm_class(self) -> type:
        """Auto: the saved LLM's config.json names its class (LlamaForCausalLM or MistralForCausalLM)."""
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM


def _tiny_config() -> Any:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig

    from vlmforge.families.tinykit import BOS_ID, EOS_ID, IMAGE_ID, PAD_ID

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=TINY.tile, patch_size=TINY.patch, projection_dim=32)
    text = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                       initializer_range=0.05)  # as tiny-llava's: the image features matter, the net stays calm
    return LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_ID,
                           image_grid_pinpoints=[list(pin) for pin in TINY.pinpoints], vision_feature_layer=-2,
                           vision_feature_select_strategy="default", projector_hidden_act="gelu",
                           tie_word_embeddings=False)


def _tiny_processor() -> Any:
    from transformers import LlavaNextProcessor

    from vlmforge.families.llava import IMAGE_TOKEN
    from vlmforge.families.tinykit import make_fast_tokenizer, pil_image_processor

    image_processor = pil_image_processor(
        "LlavaNextImageProcessor", size={"shortest_edge": TINY.tile},
        crop_size={"height": TINY.tile, "width": TINY.tile},
        image_grid_pinpoints=[list(pin) for pin in TINY.pinpoints])
    return LlavaNextProcessor(image_processor=image_processor, tokenizer=make_fast_tokenizer(vocab_size=320),
                              patch_size=TINY.patch, vision_feature_select_strategy="default",
                              image_token=IMAGE_TOKEN, num_additional_image_tokens=1)
