"""Mllama / Llama-3.2-Vision (meta-llama/Llama-3.2-11B-Vision, -90B-Vision, and their -Instruct): cross-attention.

The prompt holds one ``<|image|>`` token per image and no visual rows. The vision model cuts each image into up to
``max_num_tiles`` (4) tiles of ``image_size`` pixels (448 for Llama-3.2-11B-Vision, 560 for the others), reads
(image_size / 14)^2 patches + 1 class token per tile, and the projector maps them to the LLM's width: the decoder's
cross-attention layers attend to those ``cross_attention_states`` under a ``cross_attention_mask`` built from the
prompt (which tiles each text position may see). Inside the encoder transformers pads each tile's patches + 1 to a
multiple of 8 (1601 -> 1608) and removes the padding again before the output, so one image gives
4 x ((S/14)^2 + 1) states: 4 x 1025 = 4100 at S=448, 4 x 1601 = 6404 at S=560, the 1.2 README's two
``--max_encoder_input_len`` values. The processor always pads an image to max_num_tiles tiles (the mask hides the
padded ones), so the count is the same for every image size: nothing is sized by visual.max_image_size.

TensorRT-LLM 1.2 builds it with its own ``examples/models/core/mllama/convert_checkpoint.py`` and
``build_multimodal_engine.py --model_type mllama`` (pixel_values [B, 1, 4, 3, S, S], aspect_ratio_ids [B, 1],
aspect_ratio_mask [B, 1, 4]: one image per request, the media axis fixed at 1); its runner feeds each request's
[1, 4, S'+1, hidden] states as the decoder's encoder input. Plans are the 1.2 README's.

hf toolchain (torch pieces in :mod:`vlmforge.families.mllama_hf`): the visual engine is the vision model and the
projector on 1.2's three inputs (the aspect-ratio ones computed on the host from the image's size); an image's
features are its real tiles' states [1, tiles x P, hidden]; the LLM prefix carries them as ``cross_states`` with their
per-position visibility (``cross_mask``), which the runner's eager batch passes to every forward. Several images per
prompt (hf toolchain only): their states one after the other, each image's visible from its own ``<|image|>`` on (the
processor's ``cross_attention_mask``); the trtllm plan refuses them (1.2's media axis is fixed at 1). The tiny model
(``tiny://mllama``, 28-pixel tiles: 5 states per tile, 20 per image) counts its budgets with its own geometry.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from vlmforge.errors import PlanError, SpecError
from vlmforge.families import register_family
from vlmforge.families.release_llm import ReleaseConverterFamily
from vlmforge.plans.model import DialectInfo, PlanContext, Step
from vlmforge.specs.schema import BuildSpec, ImageSize, KvCacheDtype, QuantMethod, parse_source
from vlmforge.specs.visual import FamilyNumber, VisualContract, VisualPlacement

if TYPE_CHECKING:
    from collections.abc import Sequence

    import torch
    from PIL import Image

    from vlmforge.families.contract import ImageFeatures, VisualInputs
    from vlmforge.modeling.generation import GenResult, LlmPrefix

PATCH = 14
MAX_TILES = 4
RUNNER_IMAGE_URL = ("https://huggingface.co/datasets/huggingface/documentation-images/resolve/"
                    "0052a70beed5bf71b92610a43a52df6d286cd5f3/diffusers/rabbit.jpg")
"""The 1.2 README's ``--image_path``: for mllama, run.py loads no default image (``load_test_data`` skips mllama), so
without it the validate step would run the decoder on dummy visual features, text only."""
QUANT_METHODS = (QuantMethod.NONE, QuantMethod.INT8_WO, QuantMethod.INT4_WO, QuantMethod.FP8)
"""What the 1.2 README lists for mllama ("BF16, Tensor Parallel, INT8 & INT4 Weight-Only, FP8")."""
KV_CACHE_DTYPES = (KvCacheDtype.AUTO, KvCacheDtype.FP8)
"""The README's FP8 build quantizes the KV cache to FP8; no other KV-cache dtype is documented for mllama."""


@dataclass(frozen=True)
class TileGeometry:
    """What one image's cross-attention states count from: the tile side, the patch side and the most tiles."""

    tile: int
    patch: int = PATCH
    max_tiles: int = MAX_TILES

    @property
    def states_per_tile(self) -> int:
        """Patches of one tile plus its class token (the encoder's padding to a multiple of 8 is removed again)."""
        return (self.tile // self.patch) ** 2 + 1

    @property
    def states_per_image(self) -> int:
        return self.max_tiles * self.states_per_tile

    def formula(self) -> str:
        side = self.tile // self.patch
        return (f"mllama cross-attention states per image = max_num_tiles x ((image_size / patch)^2 + 1 class token) "
                f"= {self.max_tiles} x ({side}^2 + 1) = {self.max_tiles} x {self.states_per_tile} "
                f"(image_size {self.tile}; transformers pads each tile to a multiple of 8 inside the encoder and "
                "removes the padding from its output)")


LLAMA_32_BASE_11B = TileGeometry(448)
LLAMA_32 = TileGeometry(560)
TINY_SOURCE = "tiny://mllama"
TINY = TileGeometry(28)
"""tiny://mllama: 28-pixel tiles, 2x2 patches + 1 class token = 5 states per tile, 20 per image."""
GEOMETRIES: dict[str, TileGeometry] = {
    "meta-llama/Llama-3.2-11B-Vision": LLAMA_32_BASE_11B,
    "meta-llama/Llama-3.2-11B-Vision-Instruct": LLAMA_32,
    "meta-llama/Llama-3.2-90B-Vision": LLAMA_32,
    "meta-llama/Llama-3.2-90B-Vision-Instruct": LLAMA_32,
}
"""vision_chunk_size of Meta's llama-models sku_list (448 for the 11B base model only, 560 for the others) and
vision_max_num_chunks 4; the Hugging Face config.json (gated) could not be read here. The 1.2 README agrees: 4100 for
Llama-3.2-11B-Vision, 6404 "for instruct"."""


def geometry_of(spec: BuildSpec) -> TileGeometry:
    """The tile geometry a spec's budgets are counted with: a known checkpoint's, else Llama-3.2's 560-pixel tiles
    (every checkpoint but the 11B base model; convert checks the checkpoint's config against it)."""
    if spec.source == TINY_SOURCE:
        return TINY
    parsed = parse_source(spec.source)
    return GEOMETRIES.get(parsed.location, LLAMA_32) if parsed.scheme == "hf" else LLAMA_32


def config_geometry(config: dict[str, Any]) -> TileGeometry:
    """The tile geometry a Mllama config.json declares (vision_config image_size, patch_size, max_num_tiles)."""
    vision = config.get("vision_config") or {}
    return TileGeometry(int(vision.get("image_size", LLAMA_32.tile)), int(vision.get("patch_size", PATCH)),
                        int(vision.get("max_num_tiles", MAX_TILES)))


@register_family
class MllamaFamily(ReleaseConverterFamily):
    """Llama-3.2-Vision: tiled ViT-H/14 with a global encoder, projector, and a Llama-3.1 decoder with
    cross-attention layers (TensorRT-LLM's mllama converter)."""

    quantizable: ClassVar[bool] = True
    name: ClassVar[str] = "mllama"
    description: ClassVar[str] = ("Llama-3.2-Vision (meta-llama/Llama-3.2-*-Vision*), 4 tiles per image, "
                                  "cross-attention decoder; several images per prompt on the hf toolchain only")
    builder_model_type: ClassVar[str] = "mllama"
    hf_class: ClassVar[str] = "MllamaForConditionalGeneration"
    default_num_visual_features: ClassVar[int] = LLAMA_32.states_per_image
    llm_kind: ClassVar[str] = "mllama"
    visual_placement: ClassVar[VisualPlacement] = VisualPlacement.CROSS_ATTENTION
    images_per_prompt_limit: ClassVar[int | None] = None
    """Several on the hf toolchain (each image's states, one after the other, each visible from its own
    ``<|image|>`` on, as transformers' processor masks them); the trtllm plan refuses more than one
    (:meth:`check_dialect`: 1.2's visual engine fixes the media axis at 1)."""
    encoder_input_formula: ClassVar[str] = ("max_images_per_prompt x num_visual_features (the cross-attention states "
                                            "of one request; TensorRT-LLM 1.2's runner feeds them per request)")
    hf_supported: ClassVar[bool] = True
    hf_unsupported_reason: ClassVar[str] = ""
    tiny_source: ClassVar[str | None] = TINY_SOURCE
    visual_engine_axes: ClassVar[dict[str, dict[int, str]]] = {
        "pixel_values": {0: "batch"}, "aspect_ratio_ids": {0: "batch"}, "aspect_ratio_mask": {0: "batch"},
        "features": {0: "batch"}}
    """TensorRT-LLM 1.2's mllama engine inputs; the batch (images) axis dynamic, as its export marks it."""
    default_max_new_tokens: ClassVar[int] = 50
    golden_prompt: ClassVar[str | None] = "<|image|><|begin_of_text|>If I had to write a haiku for this one"
    visual_weight_prefixes: ClassVar[tuple[str, ...]] = (
        "model.vision_model.", "model.multi_modal_projector.", "vision_model.", "multi_modal_projector.")
    llm_config_keys: ClassVar[tuple[str, ...]] = ("text_config",)

    # --- the visual contract ----------------------------------------------------------------------------------

    def num_visual_features(self, spec: BuildSpec) -> int:
        return geometry_of(spec).states_per_image

    def visual_contract(self, spec: BuildSpec) -> VisualContract:
        """Fixed per image (every image is padded to max_num_tiles tiles); the source says how it is counted."""
        return replace(super().visual_contract(spec), tokens_source=geometry_of(spec).formula())

    def encoder_input_len(self, spec: BuildSpec, num_visual_features: int) -> int:
        return (spec.limits.max_images_per_prompt or 1) * num_visual_features

    def family_numbers(self, spec: BuildSpec, size: ImageSize | None) -> tuple[FamilyNumber, ...]:
        limits = spec.limits
        return (FamilyNumber(
            "max_num_tokens", self.num_tokens(spec), f"max_batch_size x max_input_len = {limits.max_batch_size} x "
            f"{limits.max_input_len} (the 1.2 README's 4096 = 4 x trtllm-build's default max_input_len 1024)",
            "trtllm-build --max_num_tokens: every prompt of a full batch in one context pass"),)

    @staticmethod
    def num_tokens(spec: BuildSpec) -> int:
        return spec.limits.max_batch_size * spec.limits.max_input_len

    def check_spec(self, spec: BuildSpec) -> None:
        if spec.architecture.num_visual_features is not None:
            geometry = geometry_of(spec)
            raise SpecError(
                f"architecture.num_visual_features does not apply to mllama: its cross-attention states per image "
                f"come from the checkpoint's tile geometry ({geometry.max_tiles} x {geometry.states_per_tile} = "
                f"{geometry.states_per_image} for {spec.source}); remove it", path="architecture.num_visual_features")
        quant = spec.quantization
        if quant.method not in QUANT_METHODS:
            raise SpecError(
                f"quantization.method {quant.method.value} is not documented for mllama: TensorRT-LLM 1.2's README "
                "lists BF16, INT8/INT4 weight-only (convert_checkpoint.py --use_weight_only) and FP8 (quantize.py) for "
                f"it; choose one of {', '.join(m.value for m in QUANT_METHODS)}", path="quantization.method")
        if quant.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise SpecError(
                f"quantization.kv_cache_dtype {quant.kv_cache_dtype.value} is not documented for mllama: the 1.2 "
                "README quantizes its KV cache to fp8 only (with --qformat fp8); set kv_cache_dtype: auto or fp8",
                path="quantization.kv_cache_dtype")
        if quant.kv_cache_dtype is KvCacheDtype.FP8 and quant.method is not QuantMethod.FP8:
            raise SpecError("quantization.kv_cache_dtype fp8 goes with quantization.method fp8 for mllama (the 1.2 "
                            "README's only FP8 KV-cache build); set both, or kv_cache_dtype: auto",
                            path="quantization.kv_cache_dtype")

    def check_dialect(self, spec: BuildSpec, info: DialectInfo) -> None:
        if (spec.limits.max_images_per_prompt or 1) > 1:
            raise PlanError(
                f"limits.max_images_per_prompt {spec.limits.max_images_per_prompt}: TensorRT-LLM {info.release}'s mllama "
                "visual engine takes [B, 1, 4, 3, S, S] (the export fixes the media axis at 1: one image per request) "
                "and its runner builds each request's cross-attention mask for one image; plan with one image per "
                "prompt, or build several-image engines with --toolchain hf")
        if info.dialect not in self.plan_dialects:
            raise PlanError(
                f"mllama cannot be planned in dialect {info.dialect.value}: TensorRT-LLM {info.release} (the seed's "
                f"release, June 2024) predates Llama-3.2-Vision (September 2024): its {info.visual_builder} has no "
                "--model_type mllama and it has no mllama convert_checkpoint.py or cross-attention decoder; "
                "TensorRT-LLM v1.2.1 builds it: set dialect: '1.2' (or --dialect 1.2)")
        super().check_dialect(spec, info)

    def check_checkpoint_config(self, spec: BuildSpec, config: dict[str, Any]) -> None:
        """The checkpoint must tile the way the spec's budgets were counted."""
        found, wanted = config_geometry(config), geometry_of(spec)
        if found != wanted:
            raise SpecError(
                f"{spec.source}'s config.json tiles with {found} ({found.states_per_image} states per image), but the "
                f"budgets were counted with {wanted} ({wanted.states_per_image}): vlmforge sizes mllama for "
                "Llama-3.2-Vision's published geometries", path="source")

    # --- the 1.2 plan -----------------------------------------------------------------------------------------

    def attention_plugin(self, ctx: PlanContext) -> list[str]:
        """The README leaves --gpt_attention_plugin at trtllm-build's default (auto)."""
        return []

    def llm_build_flags(self, ctx: PlanContext) -> list[str]:
        """``--gemm_plugin auto`` (the checkpoint's dtype), as the README writes it for BF16 and FP8 alike."""
        flags = ["--gemm_plugin", "auto"]
        if ctx.spec.limits.max_beam_width != 1:
            flags += ["--max_beam_width", str(ctx.spec.limits.max_beam_width)]
        return flags

    def max_num_tokens(self, ctx: PlanContext) -> int:
        return self.num_tokens(ctx.spec)

    def llm_step(self, ctx: PlanContext) -> tuple[Step, str]:
        """The README's trtllm-build: --max_encoder_input_len (the cross-attention states of one request) and no
        --max_multimodal_len (no prompt table). FP8 adds the README's paged and FP8 context FMHA."""
        derived = ctx.derived
        ckpt = ctx.layout.checkpoint_dir
        out = posixpath.join(ctx.layout.engine_dir, "llm")
        assert derived.max_encoder_input_len is not None
        argv = ["trtllm-build", "--checkpoint_dir", ckpt, "--output_dir", out] + self.llm_build_flags(ctx) + [
            "--max_batch_size", str(ctx.spec.limits.max_batch_size),
            "--max_input_len", str(derived.max_input_len),
            *self.sizing_flag_for_output(ctx),
            "--max_num_tokens", str(self.max_num_tokens(ctx)),
            "--max_encoder_input_len", str(derived.max_encoder_input_len),
        ]
        if ctx.spec.quantization.method is QuantMethod.FP8:
            argv += ["--use_paged_context_fmha", "enable", "--use_fp8_context_fmha", "enable"]
        return ctx.step("build-llm", argv, tool="trtllm-build", gpus=1, inputs=[ckpt], outputs=[out]), out

    def validate_step(self, ctx: PlanContext, engine_args: list[str], inputs: list[str]) -> Step:
        """run.py with the README's image: for mllama it loads none by itself."""
        return super().validate_step(ctx, engine_args + ["--image_path", RUNNER_IMAGE_URL], inputs)

    # --- hf toolchain (torch pieces: vlmforge.families.mllama_hf) ---------------------------------------------

    def make_tiny(self, out_dir: Path, seed: int = 0) -> None:
        from vlmforge.families.mllama_hf import tiny_model, tiny_processor

        tiny_model(seed).save_pretrained(out_dir)
        tiny_processor().save_pretrained(out_dir)

    def hf_model_class(self) -> type:
        from transformers import MllamaForConditionalGeneration

        return MllamaForConditionalGeneration

    def architecture_facts(self, config: dict[str, Any]) -> Any:
        """The cross-attention states of one image (the config's tile geometry) and the LLM's attention heads."""
        from vlmforge.families.base import ArchitectureFacts

        heads = (config.get("text_config") or {}).get("num_attention_heads", 32)
        return ArchitectureFacts(config_geometry(config).states_per_image, int(heads))

    def format_prompt(self, text: str | None, num_images: int = 1) -> str | None:
        """``<|image|><|begin_of_text|>{text}`` (the 1.2 README's and the base models' form), one ``<|image|>`` per
        image; text holding ``<|image|>`` is kept as it is, but text in that form for one image (one leading
        ``<|image|>``, e.g. the golden prompt) given several gets one leading ``<|image|>`` per image."""
        from vlmforge.families.llava import DEFAULT_USER_TEXT
        from vlmforge.families.mllama_hf import BEGIN, IMAGE_TOKEN

        self.check_image_count(num_images)
        text = DEFAULT_USER_TEXT if text is None else text
        if IMAGE_TOKEN not in text:
            return IMAGE_TOKEN * num_images + BEGIN + text
        if num_images > 1 and text.startswith(IMAGE_TOKEN) and text.count(IMAGE_TOKEN) == 1:
            return IMAGE_TOKEN * (num_images - 1) + text
        return text

    def golden_images(self) -> list[Image.Image]:
        """The golden images at three sizes and tile grids (tiny model: 2x2, 1x3 and 3x1 tiles)."""
        from vlmforge.modeling.images import synthetic_images

        square, wide, tall = synthetic_images()
        return [square.resize((56, 56)), wide.resize((90, 40)), tall.resize((40, 90))]

    def visual_inputs(self, processor: Any, images: Sequence[Image.Image]) -> VisualInputs:
        """Each image's tiles [1, 1, max_tiles, 3, S, S] (padded to max_tiles, as the engine takes them), one engine
        input per image."""
        import torch

        from vlmforge.families.contract import VisualInputs

        parts = [processor.image_processor(images=[[image]], return_tensors="pt")["pixel_values"].to(torch.float32)
                 for image in images]
        return VisualInputs(torch.cat(parts), [1] * len(parts), [(image.height, image.width) for image in images])

    def pixel_values(self, processor: Any, images: list[Image.Image]) -> torch.Tensor:
        return self.visual_inputs(processor, images).pixels

    def visual_module(self, model: Any) -> torch.nn.Module:
        from vlmforge.families.mllama_hf import visual_module_class

        return visual_module_class()(model).eval()

    def visual_engine_feeds(self, inputs: VisualInputs, max_batch_size: int,
                            extras: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Up to ``max_batch_size`` images per call: their tiles and the aspect-ratio inputs of their sizes."""
        from vlmforge.families.mllama_hf import aspect_inputs

        max_tiles, tile = int(inputs.pixels.shape[2]), int(inputs.pixels.shape[-1])
        feeds = []
        for first in range(0, len(inputs.image_sizes), max_batch_size):
            part = inputs.select(range(first, min(first + max_batch_size, len(inputs.image_sizes))))
            ids, mask = aspect_inputs(part.image_sizes, max_tiles, tile)
            feeds.append({"pixel_values": part.pixels, "aspect_ratio_ids": ids, "aspect_ratio_mask": mask})
        return feeds

    def visual_outputs(self, module: torch.nn.Module, inputs: VisualInputs) -> torch.Tensor:
        import torch

        return torch.cat([module(*feed.values()) for feed in self.visual_engine_feeds(inputs, len(inputs.image_sizes),
                                                                                      {})])

    def pack_visual_features(self, processor: Any, outputs: torch.Tensor, image_size: tuple[int, int],
                             extras: dict[str, torch.Tensor]) -> torch.Tensor:
        """One image's states [1, 1, max_tiles, P, hidden] -> its real tiles' rows [1, tiles x P, hidden]."""
        from vlmforge.families.mllama_hf import tile_grid

        max_tiles, per_tile = int(outputs.shape[2]), int(outputs.shape[3])
        rows, columns = tile_grid(*image_size, max_tiles, int(processor.image_processor.size["height"]))
        return outputs[0, 0, : rows * columns].reshape(1, rows * columns * per_tile, outputs.shape[-1])

    def extract_llm(self, model: Any) -> Any:
        """transformers' ``MllamaForCausalLM`` (taking the states' visibility) around the full model's own language
        model and head (shared, not copied)."""
        from vlmforge.families.base import wrap_language_model
        from vlmforge.families.mllama_hf import causal_lm_class

        return wrap_language_model(model, causal_lm_class(), architectures=["MllamaForCausalLM"])

    def llm_class(self) -> type:
        from vlmforge.families.mllama_hf import causal_lm_class

        return causal_lm_class()

    def _prompt_ids(self, processor: Any, prompt: str | None, num_images: int = 1) -> Any:
        """The prompt's ids as MllamaProcessor makes them (``<|begin_of_text|>`` added after the leading images where
        missing); no placeholder is expanded (the states are not prompt positions)."""
        from transformers.models.mllama.processing_mllama import build_string_from_input

        text = self.format_prompt(prompt, num_images)
        assert text is not None
        text = build_string_from_input(text, processor.tokenizer.bos_token, processor.image_token)
        if text.count(processor.image_token) != num_images:
            what = "one" if num_images == 1 else str(num_images)
            raise ValueError(f"an mllama prompt for {what} image{'s' * (num_images > 1)} holds exactly {what} "
                             f"{processor.image_token}: {text!r}")
        return processor.tokenizer(text, return_tensors="pt").input_ids

    def prompt_length(self, processor: Any, prompt: str | None, num_visual_features: int | Sequence[int]) -> int:
        counts = self.visual_counts(num_visual_features)
        return int(self._prompt_ids(processor, prompt, len(counts)).shape[1])

    def llm_prefix(self, llm: Any, processor: Any, features: ImageFeatures, prompt: str | None) -> LlmPrefix:
        """The prompt's embeddings (text only) and the images' states, one after the other, with their per-position
        visibility (each image's from its own ``<|image|>`` on, as the processor's cross_attention_mask)."""
        import torch

        from vlmforge.families.mllama_hf import visibility
        from vlmforge.modeling.devices import model_device
        from vlmforge.modeling.generation import LlmPrefix, eos_ids

        parts = self.image_features(features)
        per_tile = self._states_per_tile(processor)
        for part in parts:
            if part.shape[1] % per_tile:
                raise ValueError(f"mllama features of {part.shape[1]} rows are not whole tiles of {per_tile} states")
        device = model_device(llm)
        states = torch.cat([part.to(device) for part in parts], dim=1)
        ids = self._prompt_ids(processor, prompt, len(parts)).to(device)
        embeds = llm.get_input_embeddings()(ids)
        seen = visibility(ids[0].tolist(), processor.image_token_id, [int(part.shape[1]) // per_tile for part in parts],
                          per_tile)
        eos = llm.generation_config.eos_token_id
        eos = eos if eos is not None else llm.config.eos_token_id
        return LlmPrefix("decoder", embeds, torch.ones_like(ids), eos_ids(eos),
                         cross_states=states.to(device, embeds.dtype), cross_mask=seen.to(device))

    def reference_generate(self, model: Any, processor: Any, image: Image.Image | Sequence[Image.Image],
                           prompt: str | None, max_new_tokens: int) -> GenResult:
        """transformers' generate on the prompt's images nested as one sample (its cross_attention_mask per image)."""
        from vlmforge.modeling.generation import ref_generate

        images = self.image_list(image)
        inputs = processor(images=[images], text=self.format_prompt(prompt, len(images)), return_tensors="pt")
        return ref_generate(model, dict(inputs), max_new_tokens)

    @staticmethod
    def _states_per_tile(processor: Any) -> int:
        """(S/14)^2 + 1 of the processor's tile side S (every Mllama checkpoint's patch is 14)."""
        return TileGeometry(int(processor.image_processor.size["height"])).states_per_tile
