"""Fuyu (adept/fuyu-8b): no vision encoder; 30x30 image patches go through one linear layer into a Persimmon LLM.

An image larger than the processor's target (fuyu-8b: 1080x1920, height x width) is scaled down to fit it, never up;
its patch grid is ceil(h/30) x ceil(w/30) at that size. The prompt holds, per grid row, one ``|SPEAKER|`` per patch and
one ``|NEWLINE|`` (a text token), then ``<s>``, the text and ``<0x04>`` (FuyuProcessor). The patches' embeddings replace
the ``|SPEAKER|`` tokens: the prompt table holds rows x cols rows, the prompt rows x (cols + 1) positions. The most an
image gives is at the target size (36 x 64 = 2304 patches + 36 newlines = 2340 positions); a spec sized for a smaller
largest image counts the grid of ``min(box, target)`` (:func:`largest_grid`).

TensorRT-LLM 1.2: ``../gpt/convert_checkpoint.py --gpt_variant persimmon``, ``build_multimodal_engine.py --model_type
fuyu`` (the Linear exported with a dynamic patch axis, profile 1 / 500 / 4096 patches: :data:`ENGINE_MAX_PATCHES`), the
README's trtllm-build flags (no attention-plugin flag, no --max_num_tokens). The seed's dialect (0.9) is refused: the
seed README has no Fuyu section and vlmforge has no table of v0.10.0's gpt converter.

hf toolchain: the visual engine is the Linear on every image's patches at once ([patches, 2700] -> [patches, hidden],
the patch axis dynamic; 1.2's is [B, 1, patches, 2700] flattened the same way), each image's features its patch grid
[1, rows, cols, hidden]; the LLM (PersimmonForCausalLM) takes the prompt's embeddings with the grid spliced in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from vlmforge.errors import SpecError
from vlmforge.families import register_family
from vlmforge.families.base import ArchitectureFacts, wrap_language_model
from vlmforge.families.release_llm import GptVariantFamily
from vlmforge.plans.model import PlanContext
from vlmforge.specs.schema import BuildSpec, ImageSize
from vlmforge.specs.visual import FamilyNumber

if TYPE_CHECKING:
    from collections.abc import Sequence

    import torch
    from PIL import Image

    from vlmforge.families.contract import ImageFeatures, VisualInputs
    from vlmforge.modeling.generation import LlmPrefix

PATCH = 30
TARGET = ImageSize(height=1080, width=1920)
"""fuyu-8b's image processor target (transformers' FuyuImageProcessor default, which its preprocessor_config.json
repeats): larger images are scaled down to fit it."""
ENGINE_MAX_PATCHES = 4096
"""1.2's build_fuyu_engine profile: [1, 1, 2700] / [1, 500, 2700] / [1, 4096, 2700] patches per image."""
IMAGE_TOKEN, NEWLINE_TOKEN, ANSWER_START = "|SPEAKER|", "|NEWLINE|", "<0x04>"
"""FuyuProcessor's image, newline and beginning-of-answer strings (the last a token of fuyu-8b's vocabulary)."""
END_OF_TEXT = "|ENDOFTEXT|"
"""A token transformers 4.57's FuyuProcessor looks up (its padding)."""
DEFAULT_USER_TEXT = "Generate a coco-style caption.\n"
"""fuyu-8b's model-card prompt."""
TINY_SOURCE = "tiny://fuyu"
TINY_TARGET = ImageSize(height=90, width=120)
"""tiny://fuyu's target: at most 3 x 4 = 12 patches + 3 newlines."""
TINY_INIT = 0.1
"""initializer_range of the tiny model (transformers' 0.02 leaves logits too flat for a wrong image to move them)."""
TINY_PATCH_INIT = 0.1
"""Std of the tiny patch projection (transformers starts it at 0.02): patch rows well above the text embeddings, so a
wrong image moves the first logits."""


@dataclass(frozen=True)
class FuyuGrid:
    rows: int
    cols: int

    @property
    def patches(self) -> int:
        return self.rows * self.cols

    @property
    def positions(self) -> int:
        """Prompt positions of the image: its patches and one newline per row."""
        return self.rows * (self.cols + 1)


def fitted_size(height: int, width: int, target: ImageSize = TARGET) -> tuple[int, int]:
    """The size FuyuImageProcessor resizes an image to: itself if it fits the target, else scaled down to fit."""
    if height <= target.height and width <= target.width:
        return height, width
    scale = min(target.height / height, target.width / width)
    return int(height * scale), int(width * scale)


def image_grid(height: int, width: int, target: ImageSize = TARGET) -> FuyuGrid:
    """One image's patch grid (FuyuProcessor: ceil of the fitted size over 30 each way)."""
    h, w = fitted_size(height, width, target)
    return FuyuGrid(math.ceil(h / PATCH), math.ceil(w / PATCH))


def largest_grid(size: ImageSize, target: ImageSize = TARGET) -> FuyuGrid:
    """The grid of the most patches (and rows) an image within ``size`` gives: ``min(size, target)`` each way (a
    larger image is scaled into the target, never past that box)."""
    return image_grid(min(size.height, target.height), min(size.width, target.width), target)


def target_of(spec: BuildSpec) -> ImageSize:
    return TINY_TARGET if spec.source == TINY_SOURCE else TARGET


@register_family
class FuyuFamily(GptVariantFamily):
    """Fuyu: image patches -> Linear -> Persimmon (TensorRT-LLM's gpt converter, variant persimmon)."""

    quantizable: ClassVar[bool] = True
    name: ClassVar[str] = "fuyu"
    description: ClassVar[str] = "Fuyu (adept/fuyu-8b), 30x30 patches through one Linear into Persimmon"
    builder_model_type: ClassVar[str] = "fuyu"
    hf_class: ClassVar[str] = "FuyuForCausalLM"
    default_num_visual_features: ClassVar[int] = 2304
    gpt_variant: ClassVar[str] = "persimmon"
    readme_section: ClassVar[str] = "Fuyu"
    fused_mlp_default: ClassVar[bool] = True
    """The README's --use_fused_mlp=enable (Persimmon's MLP is not gated: the flag changes nothing; 1.2's default)."""
    supports_fused_mlp: ClassVar[bool] = True
    size_dependent_tokens: ClassVar[bool] = True
    default_max_image_size: ClassVar[ImageSize | None] = TARGET
    images_per_prompt_limit: ClassVar[int | None] = 1
    """FuyuProcessor puts one image before the text; transformers says Fuyu cannot take several."""
    hf_supported: ClassVar[bool] = True
    hf_unsupported_reason: ClassVar[str] = ""
    tiny_source: ClassVar[str | None] = TINY_SOURCE
    golden_prompt: ClassVar[str | None] = DEFAULT_USER_TEXT
    visual_weight_prefixes: ClassVar[tuple[str, ...]] = ("model.vision_embed_tokens.", "vision_embed_tokens.")
    llm_config_keys: ClassVar[tuple[str, ...]] = ("text_config",)
    visual_engine_axes: ClassVar[dict[str, dict[int, str]]] = {"patches": {0: "patches"}, "features": {0: "patches"}}

    # --- visual contract and plans ------------------------------------------------------------

    def visual_tokens(self, spec: BuildSpec, size: ImageSize | None) -> int:
        assert size is not None
        return largest_grid(size, target_of(spec)).patches

    def visual_token_formula(self, spec: BuildSpec, size: ImageSize | None) -> str:
        assert size is not None
        target = target_of(spec)
        grid = largest_grid(size, target)
        return (f"fuyu: the image fitted into {target.height}x{target.width}, ceil(h/30) x ceil(w/30) = {grid.rows} x "
                f"{grid.cols} patches (the prompt table's rows)")

    def family_numbers(self, spec: BuildSpec, size: ImageSize | None) -> tuple[FamilyNumber, ...]:
        assert size is not None
        grid = largest_grid(size, target_of(spec))
        return (FamilyNumber("prompt_positions_per_image", grid.positions,
                             f"{grid.patches} patches + {grid.rows} |NEWLINE| tokens (one per grid row)",
                             "what one image takes of max_input_len (the newlines are text tokens)"),)

    def check_spec(self, spec: BuildSpec) -> None:
        super().check_spec(spec)
        size = spec.visual.max_image_size or self.default_max_image_size
        assert size is not None
        grid = largest_grid(size, target_of(spec))
        if spec.limits.max_input_len < grid.positions:
            raise SpecError(
                f"max_input_len ({spec.limits.max_input_len}) cannot hold one fuyu image of {size}: {grid.patches} "
                f"patches + {grid.rows} newline tokens = {grid.positions} prompt positions; raise "
                f"limits.max_input_len to at least {grid.positions} plus the text or lower visual.max_image_size",
                path="limits.max_input_len")
        if grid.patches > ENGINE_MAX_PATCHES:
            raise SpecError(f"one image of {size} gives {grid.patches} patches, over the {ENGINE_MAX_PATCHES} of "
                            "TensorRT-LLM's fuyu visual-engine profile: lower visual.max_image_size",
                            path="visual.max_image_size")

    def attention_plugin(self, ctx: PlanContext) -> list[str]:
        return []  # the README's fuyu build leaves the plugin at its default

    # --- hf toolchain -----------------------------------------------------------------------

    def make_tiny(self, out_dir: Path, seed: int = 0) -> None:
        import torch
        from transformers import FuyuForCausalLM

        from vlmforge.modeling.devices import seed_all

        processor = _tiny_processor()
        seed_all(seed)
        model = FuyuForCausalLM(_tiny_config(processor.tokenizer)).eval()
        with torch.no_grad():
            model.model.vision_embed_tokens.weight.normal_(0.0, TINY_PATCH_INIT)
        model.save_pretrained(out_dir)
        processor.save_pretrained(out_dir)

    def hf_model_class(self) -> type:
        from transformers import FuyuForCausalLM

        return FuyuForCausalLM

    def load_processor(self, model_dir: Path) -> Any:
        """FuyuProcessor, its transformers-5 PIL image processor fixed to patchify the tensors the processor hands it
        (:func:`_patchify_fix`)."""
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(model_dir)
        processor.image_processor.__class__ = _patchify_fix(type(processor.image_processor))
        return processor

    def architecture_facts(self, config: dict[str, Any]) -> ArchitectureFacts:
        """The most patches of fuyu-8b's processor (its 1080x1920 target) and the LLM's attention heads."""
        text = config.get("text_config") or {}
        return ArchitectureFacts(largest_grid(TARGET).patches, int(text.get("num_attention_heads", 64)))

    def format_prompt(self, text: str | None, num_images: int = 1) -> str | None:
        """The text as it is (FuyuProcessor adds the image, ``<s>`` and ``<0x04>``); None: the model card's prompt."""
        self.check_image_count(num_images)
        return DEFAULT_USER_TEXT if text is None else text

    def golden_images(self) -> list[Image.Image]:
        """Three images of three grids (tiny model: 3x4 after scaling 200x150 into 120x90, then 2x4 and 3x2)."""
        from vlmforge.modeling.images import synthetic_images

        square, wide, tall = synthetic_images()
        return [square.resize((200, 150)), wide.resize((100, 45)), tall.resize((50, 80))]

    def _target(self, processor: Any) -> ImageSize:
        size = processor.image_processor.size
        return ImageSize(height=int(size["height"]), width=int(size["width"]))

    def visual_inputs(self, processor: Any, images: Sequence[Image.Image]) -> VisualInputs:
        """Each image's patches [rows*cols, 3*30*30] (FuyuProcessor's), concatenated."""
        import torch

        from vlmforge.families.contract import VisualInputs

        parts = []
        for image in images:
            out = processor(images=[image], text=DEFAULT_USER_TEXT, return_tensors="pt")
            patches = out["image_patches"]
            patches = patches[0] if isinstance(patches, list) else patches  # transformers 4.57: one per sample
            parts.append(patches.reshape(-1, patches.shape[-1]).to(torch.float32))
        counts = [int(part.shape[0]) for part in parts]
        return VisualInputs(torch.cat(parts), counts, [(image.height, image.width) for image in images])

    def pixel_values(self, processor: Any, images: list[Image.Image]) -> torch.Tensor:
        return self.visual_inputs(processor, images).pixels

    def visual_module(self, model: Any) -> torch.nn.Module:
        return _visual_module_class()(model).eval()

    def visual_engine_feeds(self, inputs: VisualInputs, max_batch_size: int,
                            extras: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Up to ``max_batch_size`` images' patches per call."""
        feeds = []
        for first in range(0, len(inputs.inputs_per_image), max_batch_size):
            part = inputs.select(range(first, min(first + max_batch_size, len(inputs.inputs_per_image))))
            feeds.append({"patches": part.pixels})
        return feeds

    def pack_visual_features(self, processor: Any, outputs: torch.Tensor, image_size: tuple[int, int],
                             extras: dict[str, torch.Tensor]) -> torch.Tensor:
        """One image's patch embeddings [rows*cols, hidden] as its grid [1, rows, cols, hidden]."""
        grid = image_grid(*image_size, self._target(processor))
        return outputs.reshape(1, grid.rows, grid.cols, outputs.shape[-1])

    def image_features(self, features: ImageFeatures) -> list[torch.Tensor]:
        parts = [features] if not isinstance(features, (list, tuple)) else list(features)
        for part in parts:
            if part.dim() != 4 or part.shape[0] != 1:
                raise ValueError(f"expected one fuyu image's patch grid [1, rows, cols, hidden], got {tuple(part.shape)}")
        self.check_image_count(len(parts))
        return parts

    def extract_llm(self, model: Any) -> Any:
        from transformers import PersimmonForCausalLM

        return wrap_language_model(model, PersimmonForCausalLM, architectures=["PersimmonForCausalLM"])

    def llm_class(self) -> type:
        from transformers import PersimmonForCausalLM

        return PersimmonForCausalLM

    def _prompt_ids(self, processor: Any, prompt: str | None, grid: FuyuGrid) -> Any:
        """FuyuProcessor's ids: the grid's placeholders then ``<s>``, tokenized alone with the first id dropped (the
        piece SentencePiece puts before them), then the text and ``<0x04>``."""
        import torch

        text = self.format_prompt(prompt)
        assert text is not None
        tokenizer = processor.tokenizer
        head = (IMAGE_TOKEN * grid.cols + NEWLINE_TOKEN) * grid.rows + "<s>"
        head_ids = tokenizer(head, add_special_tokens=False, return_tensors="pt").input_ids[:, 1:]
        text_ids = tokenizer(text + ANSWER_START, add_special_tokens=False, return_tensors="pt").input_ids
        return torch.cat([head_ids, text_ids], dim=1)

    def prompt_length(self, processor: Any, prompt: str | None, num_visual_features: int | Sequence[int]) -> int:
        """Positions of the prompt for an image of ``num_visual_features`` patches: text, ``<s>``, patches and one
        newline per grid row, the grid being the one of most rows that gives that many patches within the target
        (exact where one grid does, e.g. the largest image's; a bound otherwise)."""
        count = self.visual_counts(num_visual_features)[0]
        target = self._target(processor)
        most_rows, most_cols = math.ceil(target.height / PATCH), math.ceil(target.width / PATCH)
        rows = max((r for r in range(1, min(count, most_rows) + 1) if count % r == 0 and count // r <= most_cols),
                   default=min(count, most_rows))
        text = self.format_prompt(prompt)
        text_ids = processor.tokenizer(f"{text}{ANSWER_START}", add_special_tokens=False).input_ids
        return len(text_ids) + 1 + count + rows  # + <s>

    def llm_prefix(self, llm: Any, processor: Any, features: ImageFeatures, prompt: str | None) -> LlmPrefix:
        """The prompt's embeddings, its ``|SPEAKER|`` tokens replaced by the image's patch embeddings (row-major)."""
        import torch

        from vlmforge.modeling.devices import model_device
        from vlmforge.modeling.generation import LlmPrefix, eos_ids

        grid_features = self.image_features(features)[0]
        device = model_device(llm)
        ids = self._prompt_ids(processor, prompt, FuyuGrid(int(grid_features.shape[1]),
                                                           int(grid_features.shape[2]))).to(device)
        embeds = llm.get_input_embeddings()(ids)
        rows = grid_features.flatten(1, 2).to(device, embeds.dtype)
        embeds = embeds.masked_scatter((ids == processor.image_token_id).unsqueeze(-1), rows)
        eos = llm.generation_config.eos_token_id
        eos = eos if eos is not None else llm.config.eos_token_id
        return LlmPrefix("decoder", embeds, torch.ones_like(ids), eos_ids(eos))

    def reference_generate(self, model: Any, processor: Any, image: Image.Image | Sequence[Image.Image],
                           prompt: str | None, max_new_tokens: int) -> Any:
        from vlmforge.modeling.generation import ref_generate

        images = self.image_list(image)
        inputs = processor(images=images, text=self.format_prompt(prompt), return_tensors="pt")
        return ref_generate(model, {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask",
                                                                               "image_patches")}, max_new_tokens)


@cache
def _patchify_fix(cls: type) -> type:
    """``cls`` whose ``patchify_image`` also takes a torch tensor: transformers 5's FuyuProcessor hands its PIL image
    processor the tensors that processor returned, and the PIL backend's numpy patchify fails on them."""
    import numpy as np
    import torch

    class FuyuPatchify(cls):  # type: ignore[misc, valid-type]
        def patchify_image(self, image: Any, patch_size: Any = None) -> Any:
            if isinstance(image, torch.Tensor) and "Pil" in cls.__name__:
                return torch.from_numpy(np.asarray(super().patchify_image(image.numpy(), patch_size=patch_size)))
            return super().patchify_image(image, patch_size=patch_size)

    FuyuPatchify.__name__ = cls.__name__
    return FuyuPatchify


@cache
def _visual_module_class() -> type:
    import torch

    class FuyuVisualModule(torch.nn.Module):
        """patches [N, 3*30*30] -> patch embeddings [N, hidden] (``FuyuModel.vision_embed_tokens``)."""

        def __init__(self, model: Any) -> None:
            super().__init__()
            self.linear = model.model.vision_embed_tokens

        def forward(self, patches: torch.Tensor) -> torch.Tensor:
            return self.linear(patches.to(self.linear.weight.dtype))

    return FuyuVisualModule


def _tiny_tokenizer() -> Any:
    """A SentencePiece-like BPE (Metaspace, ``▁`` before the first piece) whose vocabulary holds ``|SPEAKER|`` and
    ``|NEWLINE|`` as pieces built by merges that go first, as fuyu-8b's does: a text starting with ``|SPEAKER|`` gives
    ``▁`` then ``|SPEAKER|``, the piece both transformers 5's and 4.57's FuyuProcessor drop (4.57 reads the image
    token's id as the second id of ``encode("|SPEAKER|")``)."""
    import json
    import string

    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from vlmforge.families.tinykit import CORPUS, SPECIAL_TOKENS

    metaspace = {"replacement": "\u2581", "prepend_scheme": "first"}
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = pre_tokenizers.Metaspace(**metaspace)
    alphabet = sorted(set("\u2581" + string.ascii_letters + string.digits + string.punctuation))
    trained.train_from_iterator(list(CORPUS) * 4, trainers.BpeTrainer(
        vocab_size=320, special_tokens=list(SPECIAL_TOKENS), initial_alphabet=alphabet, show_progress=False))
    model = json.loads(trained.to_str())["model"]
    vocab = dict(model["vocab"])
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    image_merges = []
    for word in (IMAGE_TOKEN, NEWLINE_TOKEN):
        for cut in range(1, len(word)):
            left, right = word[:cut], word[cut]
            vocab.setdefault(left + right, len(vocab))
            image_merges.append((left, right))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=image_merges + merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(**metaspace)
    tok.decoder = decoders.Metaspace(**metaspace)
    tok.add_special_tokens([AddedToken(token, special=True) for token in (*SPECIAL_TOKENS, ANSWER_START, END_OF_TEXT)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", model_input_names=["input_ids", "attention_mask"])


def _tiny_processor() -> Any:
    from transformers import FuyuProcessor

    from vlmforge.families.tinykit import pil_image_processor

    image_processor = pil_image_processor("FuyuImageProcessor", size={"height": TINY_TARGET.height,
                                                                      "width": TINY_TARGET.width},
                                          patch_size={"height": PATCH, "width": PATCH})
    return FuyuProcessor(image_processor=image_processor, tokenizer=_tiny_tokenizer())


def _tiny_config(tokenizer: Any) -> Any:
    from transformers import FuyuConfig, PersimmonConfig

    from vlmforge.families.tinykit import BOS_ID, EOS_ID, PAD_ID

    vocab = len(tokenizer)
    text = PersimmonConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=256, bos_token_id=BOS_ID,
                           eos_token_id=EOS_ID, pad_token_id=PAD_ID, initializer_range=TINY_INIT)
    return FuyuConfig(text_config=text.to_dict(), vocab_size=vocab, hidden_size=64, patch_size=PATCH, num_channels=3,
                      image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), bos_token_id=BOS_ID,
                      eos_token_id=EOS_ID, pad_token_id=PAD_ID, tie_word_embeddings=False,
                      initializer_range=TINY_INIT)
