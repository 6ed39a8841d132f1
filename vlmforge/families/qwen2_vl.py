"""Qwen2-VL (Qwen/Qwen2-VL-2B-Instruct, -7B-Instruct): dynamic resolution, 2x2 patch merge, M-RoPE positions.

Each image keeps (about) its own size: ``smart_resize`` rounds height and width to multiples of 28 (14-pixel patches,
merged 2x2) within [min_pixels, max_pixels]; the vision tower reads (h/14)(w/14) patch rows and the LLM
(h/14)(w/14)/4 tokens. TensorRT-LLM 1.2's visual engine takes the rows of every image of a call concatenated: its
profile holds min_hw_dims to max_hw_dims x max_batch_size rows, so the plan sizes --max_hw_dims to the rows of the
spec's largest image and --min_hw_dims to the smallest image the processor makes. Positions are M-RoPE (time, height,
width); the release's qwen converter reads that from the checkpoint's config (no flag). Plans are the 1.2 README's.

hf toolchain (torch pieces in :mod:`vlmforge.families.qwen2_vl_hf`): the visual engine takes each call's patch rows,
rope table and block-diagonal mask (1.2's export; the host computes the last two from the images' grids, with the
tower's frequencies saved beside the engine), each image's features are its merged grid [1, h/2, w/2, hidden], and
the LLM prefix carries M-RoPE position ids. The tiny model (``tiny://qwen2-vl``) counts its budgets with its own
processor's pixel limits (:func:`pixel_limits`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from vlmforge.errors import PlanError, SpecError
from vlmforge.families import register_family
from vlmforge.families.base import expand_image_tokens, wrap_language_model
from vlmforge.families.release_llm import ReleaseConverterFamily
from vlmforge.plans.model import DialectInfo, PlanContext, Step
from vlmforge.specs.schema import BuildSpec, ImageSize
from vlmforge.specs.visual import FamilyNumber

if TYPE_CHECKING:
    from collections.abc import Sequence

    import torch
    from PIL import Image

    from vlmforge.families.contract import ImageFeatures, VisualInputs
    from vlmforge.modeling.generation import LlmPrefix

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
ROPE_FILE = "vision_rope.safetensors"
ROPE_KEY = "inv_freq"
PROMPT_TEMPLATE = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{images}{text}"
                   "<|im_end|>\n<|im_start|>assistant\n")
"""Qwen2-VL-Instruct's chat template (its default system message; one vision block per image)."""
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


def pixel_limits(spec: BuildSpec) -> tuple[int, int]:
    """(min_pixels, max_pixels) a spec's budgets are counted with: the tiny models' processor's, or the real
    checkpoints' (convert checks the checkpoint's patch and merge sizes)."""
    from vlmforge.families.qwen2_vl_hf import TINY_MAX_PIXELS, TINY_MIN_PIXELS

    tiny = spec.source.startswith("tiny://")  # tiny://qwen2-vl and tiny://qwen2.5-vl share the tiny processor
    return (TINY_MIN_PIXELS, TINY_MAX_PIXELS) if tiny else (MIN_PIXELS, MAX_PIXELS)


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
    quantizable: ClassVar[bool] = True
    hf_supported: ClassVar[bool] = True
    tiny_source: ClassVar[str | None] = "tiny://qwen2-vl"
    visual_weight_prefixes: ClassVar[tuple[str, ...]] = ("model.visual.", "visual.")
    llm_config_keys: ClassVar[tuple[str, ...]] = ("text_config",)
    visual_engine_axes: ClassVar[dict[str, dict[int, str]]] = {
        "rows": {0: "rows"}, "rotary_pos_emb": {0: "rows"}, "attention_mask": {1: "rows", 2: "rows"},
        "features": {0: "tokens"}}
    """TensorRT-LLM 1.2's qwen2_vl engine inputs (its ``input`` is ``rows`` here), rows dynamic."""

    def visual_tokens(self, spec: BuildSpec, size: ImageSize | None) -> int:
        assert size is not None
        return largest_tokens(size, *pixel_limits(spec))[0]

    def visual_token_formula(self, spec: BuildSpec, size: ImageSize | None) -> str:
        assert size is not None
        return largest_tokens(size, *pixel_limits(spec))[1]

    def visual_numbers(self, spec: BuildSpec, size: ImageSize | None) -> tuple[FamilyNumber, ...]:
        assert size is not None
        tokens = largest_tokens(size, *pixel_limits(spec))[0]
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

    # --- hf toolchain (torch pieces: vlmforge.families.qwen2_vl_hf) -------------------------------------------

    def make_tiny(self, out_dir: Path, seed: int = 0) -> None:
        from vlmforge.families.qwen2_vl_hf import tiny_processor
        from vlmforge.modeling.devices import seed_all

        seed_all(seed)
        self.hf_model_class()(self.tiny_config()).eval().save_pretrained(out_dir)
        tiny_processor(self.name).save_pretrained(out_dir)

    def tiny_config(self) -> Any:
        from vlmforge.families.qwen2_vl_hf import tiny_config

        return tiny_config()

    def hf_model_class(self) -> type:
        import transformers

        return getattr(transformers, self.hf_class)

    def load_processor(self, model_dir: Path) -> Any:
        """Qwen2VLProcessor for images only (transformers' video processor needs torchvision)."""
        from vlmforge.families.qwen2_vl_hf import processor_class

        return processor_class(self.name).from_pretrained(model_dir)

    def architecture_facts(self, config: dict[str, Any]) -> Any:
        """The most tokens of the real processors (max_pixels / 28^2) and the LLM's attention heads."""
        from vlmforge.families.base import ArchitectureFacts

        heads = (config.get("text_config") or config).get("num_attention_heads", 12)
        return ArchitectureFacts(MAX_PIXELS // (FACTOR * FACTOR), int(heads))

    def check_checkpoint_config(self, spec: BuildSpec, config: dict[str, Any]) -> None:
        """The budgets count 14-pixel patches merged 2x2: a checkpoint with other sizes is refused."""
        vision = config.get("vision_config") or {}
        got = (int(vision.get("patch_size", PATCH)), int(vision.get("spatial_merge_size", MERGE)))
        if got != (PATCH, MERGE):
            raise SpecError(f"{spec.source}'s vision_config has patch_size {got[0]} and spatial_merge_size {got[1]}; "
                            f"vlmforge counts qwen2_vl tokens for {PATCH} and {MERGE} (every Qwen2-VL checkpoint)",
                            path="source")

    def format_prompt(self, text: str | None, num_images: int = 1) -> str | None:
        """Qwen2-VL's chat template: the default system message, then the user turn with one
        ``<|vision_start|><|image_pad|><|vision_end|>`` per image before the text; text holding ``<|image_pad|>``
        is kept as it is."""
        from vlmforge.families.llava import DEFAULT_USER_TEXT
        from vlmforge.families.qwen2_vl_hf import IMAGE_PAD, VISION_END, VISION_START

        self.check_image_count(num_images)
        text = DEFAULT_USER_TEXT if text is None else text
        if IMAGE_PAD in text:
            return text
        images = (VISION_START + IMAGE_PAD + VISION_END) * num_images
        return PROMPT_TEMPLATE.format(images=images, text=text)

    def golden_images(self) -> list[Image.Image]:
        """The golden images at three sizes and shapes (tiny model: 4x4 merged grid, its most, then 2x4 and 4x2)."""
        from vlmforge.modeling.images import synthetic_images

        square, wide, tall = synthetic_images()
        return [square.resize((112, 112)), wide.resize((120, 60)), tall.resize((50, 100))]

    def visual_inputs(self, processor: Any, images: Sequence[Image.Image]) -> VisualInputs:
        """Each image's patch rows [t*h*w, 1176] at its own smart_resize size, concatenated, with its grid."""
        import torch

        from vlmforge.families.contract import VisualInputs

        rows, grids = [], []
        for image in images:
            out = processor.image_processor(images=[image], return_tensors="pt")
            rows.append(out["pixel_values"].to(torch.float32))
            grids.append(tuple(int(v) for v in out["image_grid_thw"][0]))
        counts = [int(part.shape[0]) for part in rows]
        return VisualInputs(torch.cat(rows), counts, [(image.height, image.width) for image in images], grids,
                            [count // ROWS_PER_TOKEN for count in counts])

    def pixel_values(self, processor: Any, images: list[Image.Image]) -> torch.Tensor:
        return self.visual_inputs(processor, images).pixels

    def visual_module(self, model: Any) -> torch.nn.Module:
        """(rows, rotary_pos_emb, attention_mask) -> [rows/4, llm_hidden] (see :mod:`~.qwen2_vl_hf`)."""
        from vlmforge.families.qwen2_vl_hf import visual_module_class

        return visual_module_class()(model).eval()

    def save_visual_extras(self, model: Any, vision_dir: Path) -> None:
        """``vision_rope.safetensors``: the tower's rotary inverse frequencies, what the host's rope table needs."""
        from safetensors.torch import save_file

        inv_freq = model.model.visual.rotary_pos_emb.inv_freq.detach().to("cpu", copy=True).float().contiguous()
        save_file({ROPE_KEY: inv_freq}, str(Path(vision_dir) / ROPE_FILE))

    def load_visual_extras(self, vision_dir: Path) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        path = Path(vision_dir) / ROPE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: a qwen2_vl visual engine needs its rope frequencies beside it (the hf "
                                    "toolchain's visual stage writes them): rebuild the engine")
        return {ROPE_KEY: load_file(str(path))[ROPE_KEY]}

    def visual_engine_feeds(self, inputs: VisualInputs, max_batch_size: int,
                            extras: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Up to ``max_batch_size`` images per call: their rows, their rope table and the block-diagonal mask."""
        assert inputs.grids is not None, "qwen2_vl's visual_inputs give every image's grid"
        feeds = []
        for first in range(0, len(inputs.grids), max_batch_size):
            part = inputs.select(range(first, min(first + max_batch_size, len(inputs.grids))))
            assert part.grids is not None
            feeds.append(self.engine_feed(part.pixels, part.grids, extras))
        return feeds

    def engine_feed(self, rows: torch.Tensor, grids: list[tuple[int, int, int]],
                    extras: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One visual-engine call's inputs, in the module's argument order: the images' rows, rope table and mask."""
        from vlmforge.families.qwen2_vl_hf import block_mask, rotary_table

        return {"rows": rows, "rotary_pos_emb": rotary_table(grids, extras[ROPE_KEY], MERGE),
                "attention_mask": block_mask(grids)}

    def module_extras(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The extras the visual stage would save, read from the torch module itself (:meth:`visual_outputs`)."""
        return {ROPE_KEY: module.visual.rotary_pos_emb.inv_freq}  # type: ignore[union-attr]

    def visual_outputs(self, module: torch.nn.Module, inputs: VisualInputs) -> torch.Tensor:
        """The module on the feeds the engine gets (every image in one call), its own rope frequencies."""
        import torch

        extras = self.module_extras(module)
        return torch.cat([module(*feed.values())
                          for feed in self.visual_engine_feeds(inputs, len(inputs.inputs_per_image), extras)])

    def pack_visual_features(self, processor: Any, outputs: torch.Tensor, image_size: tuple[int, int],
                             extras: dict[str, torch.Tensor]) -> torch.Tensor:
        """One image's merged rows [h*w/4, hidden] as its merged grid [1, h/2, w/2, hidden] (M-RoPE needs the grid's
        shape; the image's smart_resize size at the processor's pixel limits gives it)."""
        size = processor.image_processor.size
        height, width = smart_resize(*image_size, int(size["shortest_edge"]), int(size["longest_edge"]))
        return outputs.reshape(1, height // FACTOR, width // FACTOR, outputs.shape[-1])

    def image_features(self, features: ImageFeatures) -> list[torch.Tensor]:
        """A request's features as one merged grid [1, h, w, hidden] per image, checked against the image limit."""
        parts = [features] if not isinstance(features, (list, tuple)) else list(features)
        for part in parts:
            if part.dim() != 4 or part.shape[0] != 1:
                raise ValueError("expected one qwen2_vl image's merged grid [1, h, w, hidden], got "
                                 f"{tuple(part.shape)}")
        self.check_image_count(len(parts))
        return parts

    def extract_llm(self, model: Any) -> Any:
        """``Qwen2VLForCausalLM`` around the full model's own M-RoPE language model and head (shared, not copied)."""
        from vlmforge.families.qwen2_vl_hf import causal_lm_class

        llm_class = causal_lm_class(self.name)
        return wrap_language_model(model, llm_class, architectures=[llm_class.__name__])

    def llm_class(self) -> type:
        from vlmforge.families.qwen2_vl_hf import causal_lm_class

        return causal_lm_class(self.name)

    def _prompt_ids(self, processor: Any, prompt: str | None, counts: list[int]) -> Any:
        """The prompt's ids, its k-th ``<|image_pad|>`` expanded to the k-th image's ``counts[k]`` tokens (what
        Qwen2VLProcessor does)."""
        prompt = self.format_prompt(prompt, len(counts))
        assert prompt is not None
        return expand_image_tokens(processor.tokenizer, prompt, processor.image_token, counts, "qwen2_vl")

    def prompt_length(self, processor: Any, prompt: str | None, num_visual_features: int | Sequence[int]) -> int:
        return int(self._prompt_ids(processor, prompt, self.visual_counts(num_visual_features)).shape[1])

    def llm_prefix(self, llm: Any, processor: Any, features: ImageFeatures, prompt: str | None) -> LlmPrefix:
        """The prompt's embeddings, each image's placeholders replaced by its merged rows, and the M-RoPE positions
        (transformers' ``get_rope_index``)."""
        import torch

        from vlmforge.families.qwen2_vl_hf import mrope_positions
        from vlmforge.modeling.devices import model_device
        from vlmforge.modeling.generation import LlmPrefix, eos_ids

        parts = self.image_features(features)
        grids = [(int(part.shape[1]), int(part.shape[2])) for part in parts]
        device = model_device(llm)
        ids = self._prompt_ids(processor, prompt, [h * w for h, w in grids]).to(device)
        embeds = llm.get_input_embeddings()(ids)
        rows = torch.cat([part.flatten(1, 2).to(device, embeds.dtype) for part in parts], dim=1)
        embeds = embeds.masked_scatter((ids == processor.image_token_id).unsqueeze(-1), rows)
        eos = llm.generation_config.eos_token_id
        eos = eos if eos is not None else llm.config.eos_token_id
        return LlmPrefix("decoder", embeds, torch.ones_like(ids), eos_ids(eos),
                         positions=mrope_positions(ids, processor.image_token_id, grids))
