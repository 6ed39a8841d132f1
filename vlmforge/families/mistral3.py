"""Mistral3 (mistralai/Mistral-Small-3.1-24B-Instruct-2503): Pixtral vision tower (2D rope, per-image attention),
2x2 patch merger, projector, Mistral LLM; ``[IMG]`` tokens by image size with ``[IMG_BREAK]`` per row and
``[IMG_END]``.

Each image keeps (about) its own size: resized so its longest edge is at most 1540 (``longest_edge``), then up to
multiples of 28 (14-pixel patches merged 2x2). An image of H x W pixels after that gives (H/28)(W/28) ``[IMG]``
tokens, written row by row with an ``[IMG_BREAK]`` after each row and ``[IMG_END]`` after the last (text tokens:
the LLM embeds them itself). The budgets count ``[IMG]`` rows (the prompt table, as TensorRT-LLM's runner does); a
prompt takes the breaks on top (:meth:`Mistral3Family.prompt_length`).

TensorRT-LLM 1.2 builds it: ``build_multimodal_engine.py --model_type pixtral`` loads
``Mistral3ForConditionalGeneration`` (a bfloat16 engine over a fixed 1540x1540 canvas with a patch mask), the LLM is
converted by ``../llama/convert_checkpoint.py`` (its LLaMAConfig takes a mistral3 config's text_config), and run.py
feeds one image per prompt. The 1.2 README has no Pixtral section: the plan is NVIDIA's own CI command
(tests/integration/defs/examples/test_multimodal.py, ``Mistral-Small-3.1-24B-Instruct-2503``). The family is called
mistral3, not pixtral: the builder's ``pixtral`` type loads Mistral3 checkpoints only; mistral-community/pixtral-12b
is a LlavaForConditionalGeneration (Pixtral tower, no merger) that neither 1.2's builder nor this family loads.

hf toolchain (torch pieces in :mod:`vlmforge.families.mistral3_hf`): a shape-dynamic visual engine fed patch rows,
their grid positions and image ids from the host; each image's features are its merged grid [1, rows, columns,
hidden] (the prompt's breaks need the grid); the LLM is transformers' MistralForCausalLM.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from vlmforge.errors import PlanError, SpecError
from vlmforge.families import register_family
from vlmforge.families.base import ArchitectureFacts, wrap_language_model
from vlmforge.families.release_llm import ReleaseConverterFamily
from vlmforge.plans.model import DialectInfo
from vlmforge.specs.schema import BuildSpec, ImageSize

if TYPE_CHECKING:
    from collections.abc import Sequence

    import torch
    from PIL import Image

    from vlmforge.families.contract import ImageFeatures, VisualInputs
    from vlmforge.modeling.generation import LlmPrefix

PATCH = 14
MERGE = 2
LONGEST_EDGE = 1540
"""Mistral-Small-3.1's processor (patch_size 14, spatial_merge_size 2) and vision_config.image_size 1540."""
TINY_SOURCE = "tiny://mistral3"
DEFAULT_USER_TEXT = "Describe the image."
PROMPT_TEMPLATE = "[INST]{images}{text}[/INST]"
"""Mistral-Small-3.1's user turn without its default system prompt (the tokenizer adds ``<s>``), images before the
text, as 1.2's run.py writes it (``<s>[INST][IMG]{text}[/INST]``)."""


def resized(height: int, width: int, longest_edge: int, factor: int) -> tuple[int, int]:
    """The (height, width) Pixtral's image processor resizes an image to: scaled down (floor) so its longest edge is
    at most ``longest_edge``, then each side up to a multiple of ``factor`` (patch x merge)."""
    ratio = max(height / longest_edge, width / longest_edge)
    if ratio > 1:
        height, width = int(math.floor(height / ratio)), int(math.floor(width / ratio))
    return ((height - 1) // factor + 1) * factor, ((width - 1) // factor + 1) * factor


def merged_grid(height: int, width: int, longest_edge: int = LONGEST_EDGE, patch: int = PATCH,
                merge: int = MERGE) -> tuple[int, int]:
    """(rows, columns) of ``[IMG]`` tokens of an image of ``height`` x ``width`` pixels."""
    factor = patch * merge
    h, w = resized(height, width, longest_edge, factor)
    return h // factor, w // factor


def processor_settings(spec: BuildSpec) -> tuple[int, int, int]:
    """(longest_edge, patch, merge) a spec's budgets are counted with: tiny://mistral3's or Mistral-Small-3.1's."""
    from vlmforge.families import mistral3_hf as hf

    if spec.source == TINY_SOURCE:
        return hf.TINY_LONGEST_EDGE, hf.TINY_PATCH, hf.TINY_MERGE
    return LONGEST_EDGE, PATCH, MERGE


def largest_grid(size: ImageSize, longest_edge: int, patch: int, merge: int) -> tuple[int, int]:
    """The merged grid of the image with the most tokens within ``size``: min(side, longest_edge) on each side (an
    image that fits is not scaled; one that is scaled ends at most there)."""
    return merged_grid(min(size.height, longest_edge), min(size.width, longest_edge), longest_edge, patch, merge)


@register_family
class Mistral3Family(ReleaseConverterFamily):
    """Mistral3: Pixtral tower with 2x2 merge + Mistral LLM (TensorRT-LLM 1.2: --model_type pixtral, llama
    converter)."""

    name: ClassVar[str] = "mistral3"
    description: ClassVar[str] = "Mistral3 (Mistral-Small-3.1), Pixtral tower, [IMG] tokens by image size"
    builder_model_type: ClassVar[str] = "pixtral"
    hf_class: ClassVar[str] = "Mistral3ForConditionalGeneration"
    default_num_visual_features: ClassVar[int] = 3025
    llm_kind: ClassVar[str] = "llama"
    supports_fused_mlp: ClassVar[bool] = True  # gated MLP; NVIDIA's CI build leaves it off
    size_dependent_tokens: ClassVar[bool] = True
    default_max_image_size: ClassVar[ImageSize | None] = ImageSize(height=LONGEST_EDGE, width=LONGEST_EDGE)
    """The largest image the processor keeps (longest edge 1540): 55 x 55 = 3025 tokens."""
    images_per_prompt_limit: ClassVar[int | None] = None  # one [IMG] per image; 1.2's plan: one (check_dialect)
    hf_supported: ClassVar[bool] = True
    quantizable: ClassVar[bool] = True
    tiny_source: ClassVar[str | None] = TINY_SOURCE
    golden_prompt: ClassVar[str | None] = "Which city is this?"
    visual_weight_prefixes: ClassVar[tuple[str, ...]] = (
        "model.vision_tower.", "model.multi_modal_projector.", "vision_tower.", "multi_modal_projector.")
    llm_config_keys: ClassVar[tuple[str, ...]] = ("text_config",)
    visual_engine_axes: ClassVar[dict[str, dict[int, str]]] = {
        "rows": {0: "rows"}, "positions": {0: "rows"}, "image_ids": {0: "rows"}, "features": {0: "tokens"}}
    """The hf visual engine's inputs (:mod:`~.mistral3_hf`), rows dynamic."""

    def visual_tokens(self, spec: BuildSpec, size: ImageSize | None) -> int:
        assert size is not None
        rows, columns = largest_grid(size, *processor_settings(spec))
        return rows * columns

    def visual_token_formula(self, spec: BuildSpec, size: ImageSize | None) -> str:
        assert size is not None
        longest, patch, merge = processor_settings(spec)
        rows, columns = largest_grid(size, longest, patch, merge)
        return (f"mistral3: longest edge <= {longest}, sides up to multiples of {patch * merge} ({patch}-pixel "
                f"patches merged {merge}x{merge}): {rows} x {columns} = {rows * columns} [IMG] (+ {rows} break/end "
                "tokens, text)")

    def check_dialect(self, spec: BuildSpec, info: DialectInfo) -> None:
        """1.2's run.py feeds one image per prompt (its pixtral path pads one image per batch entry)."""
        super().check_dialect(spec, info)
        if (spec.limits.max_images_per_prompt or 1) > 1:
            raise PlanError(f"limits.max_images_per_prompt {spec.limits.max_images_per_prompt}: TensorRT-LLM "
                            f"{info.release}'s multimodal runner takes one image per prompt for --model_type pixtral; "
                            "plan with one image per prompt, or build several-image engines with --toolchain hf")

    def check_checkpoint_config(self, spec: BuildSpec, config: dict[str, Any]) -> None:
        """The budgets count the processor's patch and merge: a checkpoint with others is refused."""
        _, patch, merge = processor_settings(spec)
        vision = config.get("vision_config") or {}
        got = (int(vision.get("patch_size", patch)), int(config.get("spatial_merge_size", merge)))
        if got != (patch, merge):
            raise SpecError(f"{spec.source}'s config has patch_size {got[0]} and spatial_merge_size {got[1]}; "
                            f"vlmforge counts mistral3 tokens for {patch} and {merge}", path="source")

    # --- hf toolchain (torch pieces: vlmforge.families.mistral3_hf) ------------------------------------------

    def make_tiny(self, out_dir: Path, seed: int = 0) -> None:
        from transformers import Mistral3ForConditionalGeneration

        from vlmforge.families.mistral3_hf import tiny_config, tiny_processor
        from vlmforge.modeling.devices import seed_all

        processor = tiny_processor()
        seed_all(seed)
        Mistral3ForConditionalGeneration(tiny_config(processor.tokenizer)).eval().save_pretrained(out_dir)
        processor.save_pretrained(out_dir)

    def hf_model_class(self) -> type:
        from transformers import Mistral3ForConditionalGeneration

        return Mistral3ForConditionalGeneration

    def load_processor(self, model_dir: Path) -> Any:
        """PixtralProcessor's work without its module (transformers 5's imports torchvision)."""
        from vlmforge.families.mistral3_hf import processor_class

        return processor_class().from_pretrained(model_dir)

    def architecture_facts(self, config: dict[str, Any]) -> ArchitectureFacts:
        """The most [IMG] tokens ((image_size / (patch x merge))^2: 3025) and the LLM's attention heads."""
        vision = config.get("vision_config") or {}
        factor = int(vision.get("patch_size", PATCH)) * int(config.get("spatial_merge_size", MERGE))
        side = -(-int(vision.get("image_size", LONGEST_EDGE)) // factor)
        heads = (config.get("text_config") or {}).get("num_attention_heads", 32)
        return ArchitectureFacts(side * side, int(heads))

    def format_prompt(self, text: str | None, num_images: int = 1) -> str | None:
        """``[INST]`` + one ``[IMG]`` per image + the text + ``[/INST]``; text already holding ``[IMG]`` is kept."""
        from vlmforge.families.mistral3_hf import IMG

        self.check_image_count(num_images)
        text = DEFAULT_USER_TEXT if text is None else text
        if IMG in text:
            return text
        return PROMPT_TEMPLATE.format(images=IMG * num_images, text=text)

    def golden_images(self) -> list[Image.Image]:
        """Three sizes and shapes (tiny model: 4x4, 2x4 and 4x3 merged grids; the second is scaled down first)."""
        from vlmforge.modeling.images import synthetic_images

        square, wide, tall = synthetic_images()
        return [square.resize((32, 32)), wide.resize((48, 20)), tall.resize((20, 28))]

    def visual_inputs(self, processor: Any, images: Sequence[Image.Image]) -> VisualInputs:
        """Each image resized on its own (no padding), as patch rows in merge-window order, with its patch grid."""
        import torch

        from vlmforge.families.contract import VisualInputs
        from vlmforge.families.mistral3_hf import patch_rows

        rows, grids = [], []
        patch, merge = processor.patch_size, processor.spatial_merge_size
        for image in images:
            pixels = processor.preprocess([image])["pixel_values"][0].to(torch.float32)
            rows.append(patch_rows(pixels, patch, merge))
            grids.append((1, pixels.shape[1] // patch, pixels.shape[2] // patch))
        counts = [int(part.shape[0]) for part in rows]
        return VisualInputs(torch.cat(rows), counts, [(image.height, image.width) for image in images], grids,
                            [count // (merge * merge) for count in counts])

    def pixel_values(self, processor: Any, images: list[Image.Image]) -> torch.Tensor:
        return self.visual_inputs(processor, images).pixels

    def visual_module(self, model: Any) -> torch.nn.Module:
        """(rows, positions, image_ids) -> [rows / 4, llm_hidden] (see :mod:`~.mistral3_hf`)."""
        from vlmforge.families.mistral3_hf import visual_module_class

        return visual_module_class()(model).eval()

    def visual_engine_feeds(self, inputs: VisualInputs, max_batch_size: int,
                            extras: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Up to ``max_batch_size`` images per call: their rows, grid positions and image ids."""
        from vlmforge.families.mistral3_hf import grid_positions, image_index

        assert inputs.grids is not None and inputs.output_rows is not None, "mistral3's visual_inputs give both"
        merge = math.isqrt(inputs.inputs_per_image[0] // inputs.output_rows[0])  # rows per token = merge^2
        feeds = []
        for first in range(0, len(inputs.grids), max_batch_size):
            part = inputs.select(range(first, min(first + max_batch_size, len(inputs.grids))))
            assert part.grids is not None
            feeds.append({"rows": part.pixels, "positions": grid_positions(part.grids, merge),
                          "image_ids": image_index(part.grids)})
        return feeds

    def visual_outputs(self, module: torch.nn.Module, inputs: VisualInputs) -> torch.Tensor:
        """The module on the feed the engine gets with every image in one call."""
        import torch

        feeds = self.visual_engine_feeds(inputs, len(inputs.image_sizes), {})
        return torch.cat([module(*feed.values()) for feed in feeds])

    def pack_visual_features(self, processor: Any, outputs: torch.Tensor, image_size: tuple[int, int],
                             extras: dict[str, torch.Tensor]) -> torch.Tensor:
        """One image's merged rows [rows * columns, hidden] as its grid [1, rows, columns, hidden] (the image's
        resized size at the processor's settings gives it)."""
        longest = int(processor.image_processor.size["longest_edge"])
        rows, columns = merged_grid(*image_size, longest, processor.patch_size, processor.spatial_merge_size)
        return outputs.reshape(1, rows, columns, outputs.shape[-1])

    def image_features(self, features: ImageFeatures) -> list[torch.Tensor]:
        """A request's features as one merged grid [1, rows, columns, hidden] per image, checked against the limit."""
        parts = [features] if not isinstance(features, (list, tuple)) else list(features)
        for part in parts:
            if part.dim() != 4 or part.shape[0] != 1:
                raise ValueError(f"expected one mistral3 image's merged grid [1, rows, columns, hidden], got "
                                 f"{tuple(part.shape)}")
        self.check_image_count(len(parts))
        return parts

    def extract_llm(self, model: Any) -> Any:
        """transformers' MistralForCausalLM around the full model's own language model and head (shared); tied as
        the full model's are (transformers 5's Mistral3Config ties by default, its text config does not: a saved LLM
        would lose a tied head)."""
        from transformers import MistralForCausalLM

        tied = model.lm_head.weight is model.model.language_model.embed_tokens.weight
        return wrap_language_model(model, MistralForCausalLM, architectures=["MistralForCausalLM"],
                                   tie_word_embeddings=tied)

    def llm_class(self) -> type:
        from transformers import MistralForCausalLM

        return MistralForCausalLM

    def _prompt_ids(self, processor: Any, prompt: str | None, grids: list[tuple[int, int]]) -> Any:
        from vlmforge.families.mistral3_hf import expand_images

        text = self.format_prompt(prompt, len(grids))
        assert text is not None
        return processor.tokenizer(expand_images(text, grids), return_tensors="pt").input_ids

    def prompt_length(self, processor: Any, prompt: str | None, num_visual_features: int | Sequence[int]) -> int:
        """The prompt's positions for images of at most ``num_visual_features`` [IMG] tokens each: the text, the
        [IMG] tokens, and the most break/end tokens such an image takes (its rows: at most the processor's longest
        edge / 28, and at most its tokens), so the bound holds for every image of that many tokens."""
        counts = self.visual_counts(num_visual_features)
        factor = processor.patch_size * processor.spatial_merge_size
        most_rows = -(-int(processor.image_processor.size["longest_edge"]) // factor)
        text = int(self._prompt_ids(processor, prompt, [(1, 1)] * len(counts)).shape[1]) - 2 * len(counts)
        return text + sum(count + min(count, most_rows) for count in counts)

    def llm_prefix(self, llm: Any, processor: Any, features: ImageFeatures, prompt: str | None) -> LlmPrefix:
        """The prompt's embeddings (the LLM's own, breaks and ends included), each image's [IMG] tokens replaced by
        its merged rows in raster order (what ``Mistral3Model`` splices)."""
        import torch

        from vlmforge.modeling.devices import model_device
        from vlmforge.modeling.generation import LlmPrefix, eos_ids

        parts = self.image_features(features)
        device = model_device(llm)
        ids = self._prompt_ids(processor, prompt, [(int(p.shape[1]), int(p.shape[2])) for p in parts]).to(device)
        embeds = llm.get_input_embeddings()(ids)
        rows = torch.cat([part.flatten(1, 2).to(device, embeds.dtype) for part in parts], dim=1)
        embeds = embeds.masked_scatter((ids == processor.image_token_id).unsqueeze(-1), rows)
        eos = llm.generation_config.eos_token_id
        eos = eos if eos is not None else llm.config.eos_token_id
        return LlmPrefix("decoder", embeds, torch.ones_like(ids), eos_ids(eos))
