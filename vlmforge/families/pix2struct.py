"""Pix2Struct (google/deplot, google/pix2struct-*): a ViT over variable-resolution patches, a T5-like decoder.

The image processor rescales each image, keeping its aspect ratio, to the most 16x16 patches that fit ``max_patches``
(2048 for DePlot), flattens each patch with its 1-based row and column ids in front ([N, 2 + 16*16*3] = 770 values)
and pads the rest with zero rows (the attention mask marks them). The vision encoder's states are what the text
decoder cross-attends to; VQA checkpoints (DePlot, config and processor ``is_vqa: true``) render the request's text as
a header onto the image first (transformers' Pix2StructProcessor: the text goes to the image processor as
``header_text``, none to the decoder, which starts from its start token alone either way).

TensorRT-LLM 1.2 (the multimodal README's "Deplot" section): ``enc_dec/convert_checkpoint.py --model_type pix2struct``
writes the decoder only, ``trtllm-build`` builds it with ``--max_encoder_input_len 2048`` (one image's padded patches
per request) and ``build_multimodal_engine.py --model_type pix2struct`` the encoder. TensorRT-LLM v0.10 (dialect 0.9)
has the scripts but the seed document has no Pix2Struct section, so that dialect is refused.

hf toolchain: the visual engine takes ``flattened_patches`` [B, P, 2+p*p*3] and their ``attention_mask`` [B, P], both
axes dynamic; each image's features are its real patches'
states [1, rows*cols, hidden] (padded rows dropped: the mask gives them no weight), fed to the decoder as cross-attention
states. torch and transformers are imported inside the hf hooks only. A VQA checkpoint's images are rendered with their
request's text (:attr:`prompt_in_image`: the runner encodes each image with its prompt and keys its image cache on
both; no text: an empty header, as TensorRT-LLM 1.2's README runs DePlot), in the font beside its processor files
(:data:`HEADER_FONT_FILE`: the convert stage stores transformers' own there, so an engine renders offline).
"""

from __future__ import annotations

import copy
import json
import math
import shutil
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
HEADER_FONT_FILE = "header_font.ttf"
"""A VQA checkpoint's header font beside its processor files (vlmforge's file: transformers fetches its own,
:data:`TRANSFORMERS_FONT`, from the hub at every render)."""
TRANSFORMERS_FONT = ("ybelkada/fonts", "Arial.TTF")
"""The hub repository and file of the font transformers' Pix2Struct image processor renders headers with."""
_FONT_ATTRIBUTE = "_vlmforge_header_font"

# The tiny test model (tiny://pix2struct): 4x4 patches, at most 64 per image (a 64x64 image: 8x8 = 64, none padded;
# 120x60: 11x5 = 55; 50x100: 5x11 = 55), a 2-layer encoder and decoder of width 32. Captioning-style (is_vqa false):
# no header is rendered, so no font is needed. tiny://pix2struct-vqa: the same with is_vqa true (config and image
# processor), its header font Pillow's built-in one (saved as HEADER_FONT_FILE: no hub).
TINY_VQA_SOURCE = "tiny://pix2struct-vqa"
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


def _tiny_config(is_vqa: bool = False) -> Any:
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
    return Pix2StructConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), is_vqa=is_vqa,
                            initializer_factor=1.0)


def _tiny_processor(is_vqa: bool = False) -> Any:
    """Pix2Struct's own processor over the locally trained BPE: as a plain fast tokenizer in transformers 5, as the
    T5TokenizerFast that transformers 4.57's Pix2StructProcessor insists on (NVIDIA's TensorRT-LLM 1.2 image)."""
    import transformers
    from transformers import Pix2StructProcessor

    from vlmforge.families.tinykit import make_fast_tokenizer, pil_image_processor, train_bpe_tokenizer

    image_processor = pil_image_processor("Pix2StructImageProcessor", patch_size={"height": TINY_PATCH, "width": TINY_PATCH},
                                          max_patches=TINY_MAX_PATCHES, is_vqa=is_vqa)
    if int(transformers.__version__.split(".")[0]) >= 5:
        tokenizer = make_fast_tokenizer("eos", TINY_VOCAB_SIZE, image_token=False)
    else:
        tokenizer = transformers.T5TokenizerFast(
            tokenizer_object=train_bpe_tokenizer(TINY_VOCAB_SIZE, "eos"), extra_ids=0, eos_token="</s>",
            pad_token="<pad>", unk_token="<unk>", model_input_names=["input_ids", "attention_mask"])
    return Pix2StructProcessor(image_processor=image_processor, tokenizer=tokenizer)


def is_vqa(processor: Any) -> bool:
    """Whether a loaded processor renders headers (its image processor's is_vqa)."""
    return bool(getattr(getattr(processor, "image_processor", processor), "is_vqa", False))


def header_font(processor: Any) -> str | None:
    """The header font :meth:`Pix2StructFamily.load_processor` found beside the processor's files; None: none there
    (transformers' own, fetched from the hub)."""
    return getattr(processor, _FONT_ATTRIBUTE, None)


def _default_font(model_dir: Path) -> Path:
    """transformers' header font (the hub's, or the hub cache's); SourceError naming the fix when unreachable."""
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(*TRANSFORMERS_FONT))
    except Exception as exc:  # offline, no cache, a hub error: all mean the same to the user
        raise SourceError(
            f"{model_dir}: a Pix2Struct VQA checkpoint renders each request's text as a header with a font, and there "
            f"is no {HEADER_FONT_FILE} beside its processor files while transformers' own ({'/'.join(TRANSFORMERS_FONT)}"
            f" on the Hugging Face hub) could not be fetched ({type(exc).__name__}: {exc}): put a TrueType font there "
            f"as {HEADER_FONT_FILE} (transformers' Arial.TTF gives its processor's pixels), or convert with hub "
            "access") from None


def render_header(image: Image.Image, header: str, font: str | None) -> Image.Image:
    """transformers' Pix2Struct render_header (4.57's and 5's: the text drawn by their ``render_text``, then header
    and image stacked at the wider one's width) of an image made RGB as their processor makes it, with ``font``
    (None: transformers' own default, from the hub)."""
    import numpy as np
    from PIL import Image as PILImage

    try:  # transformers 5: the PIL backend's module (the torchvision one needs torchvision)
        from transformers.models.pix2struct.image_processing_pil_pix2struct import render_text
    except ImportError:  # transformers 4.57
        from transformers.models.pix2struct.image_processing_pix2struct import render_text
    if image.mode != "RGB":  # transformers' convert_to_rgb: transparency composited onto white
        from transformers.image_transforms import convert_to_rgb

        try:
            image = PILImage.fromarray(np.asarray(convert_to_rgb(image, return_numpy=True)))
        except TypeError:  # 4.57: no return_numpy
            image = PILImage.fromarray(np.asarray(convert_to_rgb(image)))
    text = render_text(header, font_path=font)
    width = max(text.width, image.width)
    height, text_height = int(image.height * (width / image.width)), int(text.height * (width / text.width))
    out = PILImage.new("RGB", (width, height + text_height), "white")
    out.paste(text.resize((width, text_height)), (0, 0))
    out.paste(image.resize((width, height)), (0, text_height))
    return out


def extract_patches(processor: Any, images: Sequence[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
    """flattened_patches [n, max_patches, 2+p*p*3] (float32) and attention_mask [n, max_patches] of images as given
    (a VQA checkpoint's headers rendered already: its image processor runs with is_vqa off, since transformers 5 takes
    no font argument), at the image processor's own max_patches (Pix2StructProcessor's call would impose 2048)."""
    import torch

    image_processor = getattr(processor, "image_processor", processor)
    if getattr(image_processor, "is_vqa", False):
        image_processor = copy.copy(image_processor)
        image_processor.is_vqa = False
    out = image_processor(images=list(images), max_patches=int(image_processor.max_patches), return_tensors="pt")
    return out["flattened_patches"].to(torch.float32), out["attention_mask"].to(torch.long)


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
    extra_tiny_sources: ClassVar[tuple[str, ...]] = (TINY_VQA_SOURCE,)
    prompt_in_image: ClassVar[bool] = True  # VQA checkpoints (image_header says which)
    visual_config_files: ClassVar[tuple[str, ...]] = (HEADER_FONT_FILE,)
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

    def make_tiny(self, out_dir: Path, seed: int = 0, *, vqa: bool = False) -> None:
        from transformers import Pix2StructForConditionalGeneration

        from vlmforge.modeling.devices import seed_all

        seed_all(seed)
        Pix2StructForConditionalGeneration(_tiny_config(vqa)).eval().save_pretrained(out_dir)
        _tiny_processor(vqa).save_pretrained(out_dir)
        if vqa:  # Pillow's built-in TrueType font (Aileron): transformers' own is on the hub
            from PIL import ImageFont

            font = ImageFont.load_default(size=36)
            if not isinstance(font, ImageFont.FreeTypeFont):
                raise RuntimeError(f"{TINY_VQA_SOURCE} needs Pillow >= 10.1 with FreeType (its built-in TrueType font "
                                   "renders the header)")
            (Path(out_dir) / HEADER_FONT_FILE).write_bytes(font.font_bytes)

    def make_tiny_source(self, source: str, out_dir: Path, seed: int = 0) -> None:
        if source == TINY_VQA_SOURCE:
            self.make_tiny(out_dir, seed, vqa=True)
        else:
            super().make_tiny_source(source, out_dir, seed)

    def load_processor(self, model_dir: Path) -> Any:
        """transformers' processor; a header font beside its files (:data:`HEADER_FONT_FILE`) is what it renders
        VQA headers with (:func:`header_font`)."""
        processor = super().load_processor(model_dir)
        font = Path(model_dir) / HEADER_FONT_FILE
        if font.is_file():
            setattr(processor, _FONT_ATTRIBUTE, str(font))
        return processor

    def save_processor(self, processor: Any, model_dir: Path, target: Path) -> None:
        """The processor's files, and a VQA checkpoint's header font (the one beside ``model_dir``'s files, or
        transformers' own from the hub: SourceError naming the fix when neither is there)."""
        processor.save_pretrained(target)
        if is_vqa(processor):
            font = header_font(processor)
            shutil.copyfile(font if font is not None else _default_font(Path(model_dir)), Path(target) / HEADER_FONT_FILE)

    def hf_model_class(self) -> type:
        from transformers import Pix2StructForConditionalGeneration

        return Pix2StructForConditionalGeneration

    def architecture_facts(self, config: dict[str, Any]) -> ArchitectureFacts:
        """The decoder's heads; max_patches is not in config.json (see :meth:`checkpoint_facts`): the default."""
        text = config.get("text_config") or {}
        return ArchitectureFacts(self.default_num_visual_features, int(text.get("num_heads", 12)))

    def checkpoint_facts(self, model_dir: Path, config: dict[str, Any]) -> ArchitectureFacts:
        """max_patches from the checkpoint's processor files (preprocessor_config.json, as google/deplot has, or
        transformers 5's processor_config.json), the decoder's heads from config.json."""
        max_patches = read_max_patches(Path(model_dir))
        return ArchitectureFacts(max_patches, self.architecture_facts(config).num_attention_heads)

    def format_prompt(self, text: str | None, num_images: int = 1) -> str | None:
        """The text itself: a VQA checkpoint's header (:meth:`image_header`); the decoder starts from its start token
        alone whatever it is (:meth:`llm_prefix`), as transformers' Pix2StructProcessor gives it no text for VQA."""
        self.check_image_count(num_images)
        return text

    def image_header(self, processor: Any, prompt: str | None) -> str | None:
        """A VQA checkpoint renders the request's text ("" without one, as TensorRT-LLM 1.2's README runs DePlot);
        a captioning one renders nothing."""
        return (prompt or "") if is_vqa(processor) else None

    def golden_images(self) -> list[Image.Image]:
        """The golden images at three sizes and shapes (tiny model: 8x8 patches, none padded; then 5x11 and 11x5 of
        its 64, the rest padded)."""
        from vlmforge.modeling.images import synthetic_images

        square, wide, tall = synthetic_images()
        return [square.resize((64, 64)), wide.resize((120, 60)), tall.resize((50, 100))]

    def rendered(self, processor: Any, images: Sequence[Image.Image],
                 headers: Sequence[str | None] | None = None) -> list[Image.Image]:
        """What the image processor extracts patches from: a VQA checkpoint's images each with its header rendered
        above it (``headers``: one per image; None or missing: ""), as transformers' processor renders
        ``header_text``, in the checkpoint's font (:func:`header_font`); a captioning checkpoint's images as given."""
        images = list(images)
        if not is_vqa(processor):
            return images
        texts = list(headers) if headers is not None else [None] * len(images)
        if len(texts) != len(images):
            raise ValueError(f"{len(texts)} headers for {len(images)} images")
        font = header_font(processor)
        return [render_header(image, text or "", font) for image, text in zip(images, texts, strict=True)]

    def _patches(self, processor: Any, images: Sequence[Image.Image],
                 headers: Sequence[str | None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """flattened_patches [n, max_patches, 2+p*p*3] (float32) and attention_mask [n, max_patches] of the
        :meth:`rendered` images (:func:`extract_patches`)."""
        return extract_patches(processor, self.rendered(processor, images, headers))

    def pixel_values(self, processor: Any, images: list[Image.Image]) -> torch.Tensor:
        return self._patches(processor, images)[0]

    def visual_inputs(self, processor: Any, images: Sequence[Image.Image]) -> VisualInputs:
        """One entry per image: its padded flattened patches (a VQA checkpoint's rendered with an empty header)."""
        return self.headed_visual_inputs(processor, images, [""] * len(images))

    def headed_visual_inputs(self, processor: Any, images: Sequence[Image.Image],
                             headers: Sequence[str]) -> VisualInputs:
        """One entry per image: the padded flattened patches of the image as :meth:`rendered` with its header, and
        the rendered image's size (what :meth:`pack_visual_features` counts the real patches of)."""
        from vlmforge.families.contract import VisualInputs

        rendered = self.rendered(processor, images, headers)
        return VisualInputs(extract_patches(processor, rendered)[0], [1] * len(rendered),
                            [(image.height, image.width) for image in rendered])

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
        """The full model on the processor's patches: a VQA checkpoint's images with ``prompt`` as their header
        (:meth:`image_header`, the same rendering the runner's path takes), the decoder from its start token."""
        from vlmforge.modeling.generation import ref_generate

        images = self.image_list(image)
        header = self.image_header(processor, self.format_prompt(prompt, len(images)))
        patches, mask = self._patches(processor, images, [header] * len(images))
        return ref_generate(model, {"flattened_patches": patches, "attention_mask": mask}, max_new_tokens)
