"""Pix2Struct (google/deplot, google/pix2struct-*): a ViT over variable-resolution patches, a T5-like decoder.

The image processor rescales each image, keeping its aspect ratio, to the most 16x16 patches that fit ``max_patches``
(2048 for DePlot), flattens each patch with its 1-based row and column ids in front ([N, 2 + 16*16*3] = 770 values)
and pads the rest with zero rows (the attention mask marks them). The vision encoder's states are what the text
decoder cross-attends to; VQA checkpoints (DePlot) render the prompt as a header onto the image first.

TensorRT-LLM 1.2 (the multimodal README's "Deplot" section): ``enc_dec/convert_checkpoint.py --model_type pix2struct``
writes the decoder only, ``trtllm-build`` builds it with ``--max_encoder_input_len 2048`` (one image's padded patches
per request) and ``build_multimodal_engine.py --model_type pix2struct`` the encoder. TensorRT-LLM v0.10 (dialect 0.9)
has the scripts but the seed document has no Pix2Struct section, so that dialect is refused.

hf toolchain: the visual engine takes ``flattened_patches`` [B, P, 2+p*p*3] and their ``attention_mask`` [B, P], both
axes dynamic; each image's features are its real patches'
states [1, rows*cols, hidden] (padded rows dropped: the mask gives them no weight), fed to the decoder as cross-attention
states. torch and transformers are imported inside the hf hooks only.
"""

from __future__ import annotations

import json
import math
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from vlmforge.errors import PlanError, SourceError
from vlmforge.families import register_family
from vlmforge.families.base import ArchitectureFacts
from vlmforge.families.cross_decoder import CrossAttentionDecoderFamily
from vlmforge.plans.model import DialectInfo, PlanContext
from vlmforge.specs.schema import BuildSpec, Dialect
from vlmforge.specs.visual import FamilyNumber, VisualPlacement

if TYPE_CHECKING:
    from collections.abc import Sequence

    import torch
    from PIL import Image

    from vlmforge.families.contract import VisualInputs
    from vlmforge.modeling.generation import GenResult
    from vlmforge.specs.schema import ImageSize

DEPLOT_MAX_PATCHES = 2048
"""DePlot's max_patches: TensorRT-LLM 1.2's README builds its decoder for 2048 encoder states and Pix2StructProcessor
calls its image processor with 2048 by default (google/deplot's preprocessor_config.json itself was not read here)."""
PREPROCESSOR_FILE = "preprocessor_config.json"
PROCESSOR_FILE = "processor_config.json"

# The tiny test model (tiny://pix2struct): 4x4 patches, at most 64 per image (a 64x64 image: 8x8 = 64, none padded;
# 120x60: 11x5 = 55; 50x100: 5x11 = 55), a 2-layer encoder and decoder of width 32. Captioning-style (is_vqa false):
# no header is rendered, so no font is needed.
TINY_PATCH = 4
TINY_MAX_PATCHES = 64
TINY_VOCAB_SIZE = 320
TINY_NUM_ATTENTION_HEADS = 4


def patch_grid(height: int, width: int, patch_h: int, patch_w: int, max_patches: int) -> tuple[int, int]:
    """Rows and columns of real patches the Pix2Struct image processor makes of a ``height`` x ``width`` image
    (its ``extract_flattened_patches``: the largest aspect-preserving grid within ``max_patches``)."""
    scale = math.sqrt(max_patches * (patch_h / height) * (patch_w / width))
    rows = max(min(math.floor(scale * height / patch_h), max_patches), 1)
    cols = max(min(math.floor(scale * width / patch_w), max_patches), 1)
    return rows, cols


def image_processor_settings(model_dir: Path) -> dict[str, Any]:
    """The image processor's saved settings in a checkpoint folder: preprocessor_config.json (google/deplot's) or
    transformers 5's processor_config.json ("image_processor"); {} when neither exists. SourceError when unreadable."""
    for name, key in ((PREPROCESSOR_FILE, None), (PROCESSOR_FILE, "image_processor")):
        path = model_dir / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
            settings = (data.get(key) or {}) if key else data
        except (OSError, ValueError, AttributeError) as exc:
            raise SourceError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None
        if isinstance(settings, dict) and settings.get("max_patches") is not None:
            return settings
    return {}


def read_max_patches(model_dir: Path) -> int:
    """The image processor's max_patches from a checkpoint folder; SourceError naming the files when none says."""
    value = image_processor_settings(model_dir).get("max_patches")
    if value is None:
        raise SourceError(f"{model_dir}: no max_patches in {PREPROCESSOR_FILE} or {PROCESSOR_FILE} (a Pix2Struct "
                          "checkpoint's image processor settings)")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise SourceError(f"{model_dir}: max_patches {value!r} is not a whole number") from None


def _processor_settings(processor: Any) -> tuple[int, int, int]:
    """(patch height, patch width, max_patches) of a loaded processor's image processor."""
    image_processor = getattr(processor, "image_processor", processor)
    patch = image_processor.patch_size
    return int(patch["height"]), int(patch["width"]), int(image_processor.max_patches)


def _tiny_config() -> Any:
    from transformers import Pix2StructConfig, Pix2StructTextConfig, Pix2StructVisionConfig

    from vlmforge.families.tinykit import BOS_ID, EOS_ID, PAD_ID

    vision = Pix2StructVisionConfig(
        hidden_size=32, patch_embed_hidden_size=TINY_PATCH * TINY_PATCH * 3, d_ff=64, d_kv=8, num_hidden_layers=2,
        num_attention_heads=TINY_NUM_ATTENTION_HEADS, seq_len=2 * TINY_MAX_PATCHES,  # row/column ids up to max_patches
        initializer_range=0.2, initializer_factor=1.0)
    text = Pix2StructTextConfig(
        vocab_size=TINY_VOCAB_SIZE, hidden_size=32, d_kv=8, d_ff=64, num_layers=2, num_heads=TINY_NUM_ATTENTION_HEADS,
        pad_token_id=PAD_ID, eos_token_id=EOS_ID, bos_token_id=BOS_ID, decoder_start_token_id=PAD_ID,
        initializer_factor=1.0, tie_word_embeddings=False)
    return Pix2StructConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), is_vqa=False,
                            initializer_factor=1.0)


def _tiny_processor() -> Any:
    """Pix2Struct's own processor over the locally trained BPE: as a plain fast tokenizer in transformers 5, as the
    T5TokenizerFast that transformers 4.57's Pix2StructProcessor insists on (NVIDIA's TensorRT-LLM 1.2 image)."""
    import transformers
    from transformers import Pix2StructProcessor

    from vlmforge.families.tinykit import make_fast_tokenizer, pil_image_processor, train_bpe_tokenizer

    image_processor = pil_image_processor("Pix2StructImageProcessor", patch_size={"height": TINY_PATCH, "width": TINY_PATCH},
                                          max_patches=TINY_MAX_PATCHES, is_vqa=False)
    if int(transformers.__version__.split(".")[0]) >= 5:
        tokenizer = make_fast_tokenizer("eos", TINY_VOCAB_SIZE, image_token=False)
    else:
        tokenizer = transformers.T5TokenizerFast(
            tokenizer_object=train_bpe_tokenizer(TINY_VOCAB_SIZE, "eos"), extra_ids=0, eos_token="</s>",
            pad_token="<pad>", unk_token="<unk>", model_input_names=["input_ids", "attention_mask"])
    return Pix2StructProcessor(image_processor=image_processor, tokenizer=tokenizer)


@cache
def _visual_module_class() -> type:
    import torch

    class Pix2StructVisualModule(torch.nn.Module):
        """(flattened_patches [B, P, 2+p*p*3], attention_mask [B, P]) -> the encoder's states [B, P, hidden]:
        embeddings, encoder and final layer norm, as TensorRT-LLM 1.2's pix2struct wrapper."""

        def __init__(self, model: Any) -> None:
            super().__init__()
            self.encoder = model.encoder

        def forward(self, flattened_patches: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            patches = flattened_patches.to(self.encoder.dtype)
            return self.encoder(flattened_patches=patches, attention_mask=attention_mask,
                                return_dict=True).last_hidden_state

    return Pix2StructVisualModule


@register_family
class Pix2StructFamily(CrossAttentionDecoderFamily):
    """Pix2Struct / DePlot: the vision encoder is the visual engine; only the T5-like decoder is a TensorRT-LLM engine."""

    name: ClassVar[str] = "pix2struct"
    description: ClassVar[str] = "Pix2Struct / DePlot (google/deplot, google/pix2struct-*), variable-resolution patches"
    default_num_visual_features: ClassVar[int] = DEPLOT_MAX_PATCHES
    builds_encoder: ClassVar[bool] = False
    context_fmha_disable: ClassVar[bool] = True  # the 1.2 README's decoder build
    golden_prompt: ClassVar[str | None] = None
    takes_prompt: ClassVar[bool] = False
    plan_dialects: ClassVar[tuple[Dialect, ...]] = (Dialect.V1_2,)
    tiny_source: ClassVar[str | None] = "tiny://pix2struct"
    encoder_input_formula: ClassVar[str] = ("max_patches (architecture.num_visual_features): the processor pads every "
                                            "image to max_patches patches, one image's states per request")
    visual_placement: ClassVar[VisualPlacement] = VisualPlacement.CROSS_ATTENTION
    visual_weight_prefixes: ClassVar[tuple[str, ...]] = ("encoder.",)
    llm_config_keys: ClassVar[tuple[str, ...]] = ("text_config",)
    visual_engine_axes: ClassVar[dict[str, dict[int, str]]] = {
        "flattened_patches": {0: "batch", 1: "patches"}, "attention_mask": {0: "batch", 1: "patches"},
        "features": {0: "batch", 1: "patches"}}
    """Patches and mask as inputs, batch and patch axes dynamic (1.2 exports one input, [B, 2048, 770] fixed, and
    derives the mask from the zero rows)."""

    def encoder_input_len(self, spec: BuildSpec, num_visual_features: int) -> int:
        return num_visual_features

    def family_numbers(self, spec: BuildSpec, size: ImageSize | None) -> tuple[FamilyNumber, ...]:
        patches = self.num_visual_features(spec)
        return (FamilyNumber("max_patches", patches, "architecture.num_visual_features" if
                             spec.architecture.num_visual_features else f"{self.name}'s default (DePlot's, TensorRT-LLM "
                             "1.2's README)", "the image processor's max_patches: every image becomes at most this "
                             "many patches (padded to it); the decoder's --max_encoder_input_len"),)

    def check_dialect(self, spec: BuildSpec, info: DialectInfo) -> None:
        if info.dialect not in self.plan_dialects:
            raise PlanError(
                f"pix2struct cannot be planned in dialect {info.dialect.value}: the seed document (TensorRT-LLM "
                f"{info.release}'s multimodal README) has no Pix2Struct/DePlot section to reproduce; TensorRT-LLM 1.2's "
                "README has one: set dialect: '1.2' (or --dialect 1.2)")
        super().check_dialect(spec, info)

    def convert_model_type(self, ctx: PlanContext) -> str:
        return "pix2struct"

    def visual_model_type(self, ctx: PlanContext) -> str:
        return "pix2struct"

    # --- hf toolchain -----------------------------------------------------------------------

    def make_tiny(self, out_dir: Path, seed: int = 0) -> None:
        from transformers import Pix2StructForConditionalGeneration

        from vlmforge.modeling.devices import seed_all

        seed_all(seed)
        Pix2StructForConditionalGeneration(_tiny_config()).eval().save_pretrained(out_dir)
        _tiny_processor().save_pretrained(out_dir)

    def hf_model_class(self) -> type:
        from transformers import Pix2StructForConditionalGeneration

        return Pix2StructForConditionalGeneration

    def architecture_facts(self, config: dict[str, Any]) -> ArchitectureFacts:
        """The decoder's heads; max_patches is not in config.json (see :meth:`checkpoint_facts`): the default."""
        text = config.get("text_config") or {}
        return ArchitectureFacts(self.default_num_visual_features, int(text.get("num_heads", 12)))

    def checkpoint_facts(self, model_dir: Path, config: dict[str, Any]) -> ArchitectureFacts:
        """max_patches from the checkpoint's processor files (preprocessor_config.json, as google/deplot has, or
        transformers 5's processor_config.json), the decoder's heads from config.json; a VQA checkpoint is refused
        (:meth:`check_checkpoint_config`) whichever file says so."""
        max_patches = read_max_patches(Path(model_dir))
        if image_processor_settings(Path(model_dir)).get("is_vqa"):
            self._refuse_vqa(str(model_dir), "its image processor's is_vqa: true")
        return ArchitectureFacts(max_patches, self.architecture_facts(config).num_attention_heads)

    def check_checkpoint_config(self, spec: BuildSpec, config: dict[str, Any]) -> None:
        """VQA checkpoints (DePlot) render the prompt onto the image: the hf runner encodes images apart from their
        prompts, so it cannot serve them yet."""
        if config.get("is_vqa"):
            self._refuse_vqa(spec.source, "config.json is_vqa: true")

    @staticmethod
    def _refuse_vqa(what: str, where: str) -> None:
        from vlmforge.errors import SpecError

        raise SpecError(
            f"{what} is a Pix2Struct VQA checkpoint ({where}): its processor renders the prompt as a header onto the "
            "image, so the visual features depend on the prompt, and the hf toolchain's runner encodes images apart "
            "from prompts; build it with the trtllm toolchain (`vlmforge plan`, dialect 1.2) or use a captioning "
            "checkpoint (is_vqa: false)", path="source")

    def format_prompt(self, text: str | None, num_images: int = 1) -> str | None:
        """Always None: the decoder starts from its start token alone (given text is ignored, as for Nougat)."""
        self.check_image_count(num_images)
        return None

    def golden_images(self) -> list[Image.Image]:
        """The golden images at three sizes and shapes (tiny model: 8x8 patches, none padded; then 5x11 and 11x5 of
        its 64, the rest padded)."""
        from vlmforge.modeling.images import synthetic_images

        square, wide, tall = synthetic_images()
        return [square.resize((64, 64)), wide.resize((120, 60)), tall.resize((50, 100))]

    def _patches(self, processor: Any, images: Sequence[Image.Image],
                 header: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """flattened_patches [n, max_patches, 2+p*p*3] (float32) and attention_mask [n, max_patches] at the image
        processor's own max_patches (Pix2StructProcessor's call would impose 2048). A VQA processor renders ``header``
        ("" when None, as TensorRT-LLM 1.2's README runs DePlot) above each image first, with the font it fetches."""
        import torch

        image_processor = getattr(processor, "image_processor", processor)
        extra = {"header_text": header or ""} if getattr(image_processor, "is_vqa", False) else {}
        out = image_processor(images=list(images), max_patches=int(image_processor.max_patches), return_tensors="pt",
                              **extra)
        return out["flattened_patches"].to(torch.float32), out["attention_mask"].to(torch.long)

    def pixel_values(self, processor: Any, images: list[Image.Image]) -> torch.Tensor:
        return self._patches(processor, images)[0]

    def visual_inputs(self, processor: Any, images: Sequence[Image.Image]) -> VisualInputs:
        """One entry per image: its padded flattened patches."""
        from vlmforge.families.contract import VisualInputs

        patches = self.pixel_values(processor, list(images))
        return VisualInputs(patches, [1] * len(images), [(image.height, image.width) for image in images])

    def visual_engine_feeds(self, inputs: VisualInputs, max_batch_size: int,
                            extras: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Up to ``max_batch_size`` images per call: their padded patches and the mask of the real ones (padding is
        zero rows: row and column ids start at 1; float, as every engine input; TensorRT-LLM 1.2's wrapper derives its mask the same way)."""
        return [{"flattened_patches": part, "attention_mask": (part.abs().sum(dim=-1) != 0).to(part.dtype)}
                for part in inputs.pixels.split(max_batch_size)]

    def visual_outputs(self, module: torch.nn.Module, inputs: VisualInputs) -> torch.Tensor:
        """The module on the feeds the engine gets (every image in one call)."""
        import torch

        return torch.cat([module(*feed.values())
                          for feed in self.visual_engine_feeds(inputs, len(inputs.inputs_per_image), {})])

    def pack_visual_features(self, processor: Any, outputs: torch.Tensor, image_size: tuple[int, int],
                             extras: dict[str, torch.Tensor]) -> torch.Tensor:
        """One image's real patches' states [1, rows*cols, hidden]: the engine's outputs without the padded rows
        (the count is the processor's grid for the image's size, :func:`patch_grid`)."""
        if outputs.shape[0] != 1:
            raise ValueError(f"pix2struct expects one visual-engine output per image, got {outputs.shape[0]}")
        rows, cols = patch_grid(*image_size, *_processor_settings(processor))
        if outputs.shape[1] < rows * cols:
            raise ValueError(f"the visual engine gave {outputs.shape[1]} states for an image of {rows * cols} patches")
        return outputs[:, : rows * cols]

    def visual_module(self, model: Any) -> torch.nn.Module:
        return _visual_module_class()(model).eval()

    def extract_llm(self, model: Any) -> Any:
        """``model.decoder`` (a ``Pix2StructTextModel``, its head included, shared with the full model), its config
        given the full model's start and end tokens (the class has no generation config of its own)."""
        llm = model.decoder
        for key in ("decoder_start_token_id", "bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(model.generation_config, key, None)
            if value is not None:
                setattr(llm.config, key, value)
        return llm.eval()

    def llm_class(self) -> type:
        from transformers import Pix2StructTextModel

        return Pix2StructTextModel

    def reference_generate(self, model: Any, processor: Any, image: Image.Image | Sequence[Image.Image],
                           prompt: str | None, max_new_tokens: int) -> GenResult:
        from vlmforge.modeling.generation import ref_generate

        images = self.image_list(image)
        self.format_prompt(prompt)
        patches, mask = self._patches(processor, images, prompt)  # the header of a VQA checkpoint (trtllm validation)
        return ref_generate(model, {"flattened_patches": patches, "attention_mask": mask}, max_new_tokens)
