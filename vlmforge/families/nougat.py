"""Nougat (facebook/nougat-*): a Swin encoder reads the page, an mBART decoder writes markup.

transformers-5 layout of ``VisionEncoderDecoderModel`` (config model_type "vision-encoder-decoder")::

    model.encoder          DonutSwinModel -> last_hidden_state [B, L, C]
    model.enc_to_dec_proj  only if the encoder's hidden size differs from the decoder's d_model
    model.decoder          MBartForCausalLM (is_decoder, add_cross_attention)

Generation starts from decoder_start_token_id (<s>) and takes no text prompt. torch and transformers
are imported inside the hf hooks only: the spec and plan layers import this module without them.
"""

from __future__ import annotations

import json
import logging
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from vlmforge.families import register_family
from vlmforge.families.base import ArchitectureFacts
from vlmforge.families.cross_decoder import CrossAttentionDecoderFamily
from vlmforge.plans.model import PlanContext
from vlmforge.specs.schema import BuildSpec
from vlmforge.specs.visual import VisualPlacement

if TYPE_CHECKING:
    from collections.abc import Sequence

    import torch
    from PIL import Image

    from vlmforge.modeling.generation import GenResult

logger = logging.getLogger(__name__)

# The tiny test model (tiny://nougat): a 64x48 page (nougat-base: 896x672), patch 4 -> 16x12 patches,
# merged once (two Swin stages) -> 8x6 = 48 encoder states (nougat-base: 28x21 = 588).
TINY_IMAGE_HW = (64, 48)
TINY_VOCAB_SIZE = 320
TINY_NUM_ATTENTION_HEADS = 4


def _tiny_config() -> Any:
    from transformers import DonutSwinConfig, MBartConfig, VisionEncoderDecoderConfig

    from vlmforge.families.tinykit import BOS_ID, EOS_ID, PAD_ID

    encoder = DonutSwinConfig(
        image_size=list(TINY_IMAGE_HW),
        patch_size=4,
        num_channels=3,
        embed_dim=16,
        depths=[1, 1],
        num_heads=[2, 4],
        window_size=4,
        mlp_ratio=2.0,
        initializer_range=0.2,  # stronger image dependence of the random decoder
    )  # hidden_size = embed_dim * 2**(len(depths)-1) = 32 = the decoder's d_model: no enc_to_dec_proj
    decoder = MBartConfig(
        vocab_size=TINY_VOCAB_SIZE,
        d_model=32,
        decoder_layers=2,
        decoder_attention_heads=TINY_NUM_ATTENTION_HEADS,
        decoder_ffn_dim=64,
        encoder_layers=0,
        max_position_embeddings=256,
        scale_embedding=True,
        is_decoder=True,
        add_cross_attention=True,
        is_encoder_decoder=False,
        tie_word_embeddings=False,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        decoder_start_token_id=BOS_ID,
        forced_eos_token_id=None,  # MBartConfig's default 2 would make generate() force </s> at max_length
        init_std=0.2,  # spread logits: robust greedy comparisons
    )
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id = BOS_ID
    config.pad_token_id = PAD_ID
    config.eos_token_id = EOS_ID
    config.bos_token_id = BOS_ID
    return config


def _tiny_processor() -> Any:
    """Nougat's own processor and tokenizer class, the tokenizer filled with the locally trained BPE."""
    import transformers
    from transformers import NougatProcessor

    from vlmforge.families.tinykit import pil_image_processor, train_bpe_tokenizer

    trained = train_bpe_tokenizer(TINY_VOCAB_SIZE, template="none")
    image_processor = pil_image_processor("NougatImageProcessor", size={"height": TINY_IMAGE_HW[0], "width": TINY_IMAGE_HW[1]})
    if hasattr(transformers, "NougatTokenizer"):  # transformers 5: the class builds its pipeline from vocab, merges
        bpe = json.loads(trained.to_str())["model"]
        merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in bpe["merges"]]
        tokenizer = transformers.NougatTokenizer(vocab=bpe["vocab"], merges=merges)
    else:  # transformers 4.57 (NVIDIA's TensorRT-LLM 1.2 image): only the fast class, over the trained BPE
        tokenizer = transformers.NougatTokenizerFast(tokenizer_object=trained)
    return NougatProcessor(image_processor=image_processor, tokenizer=tokenizer)


@cache
def _visual_module_class() -> type:
    import torch

    class NougatVisualModule(torch.nn.Module):
        """pixel_values [B, 3, H, W] -> encoder_hidden_states [B, L, decoder_d_model] (what the decoder attends to)."""

        def __init__(self, model: Any) -> None:
            super().__init__()
            self.encoder = model.encoder
            self.proj = getattr(model, "enc_to_dec_proj", None)

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            pixel_values = pixel_values.to(self.encoder.dtype)
            hidden = self.encoder(pixel_values=pixel_values, return_dict=True).last_hidden_state
            return self.proj(hidden) if self.proj is not None else hidden

    return NougatVisualModule


@register_family
class NougatFamily(CrossAttentionDecoderFamily):
    """Nougat: the Swin encoder is the visual engine; only the mBART decoder is a TensorRT-LLM engine."""

    name: ClassVar[str] = "nougat"
    description: ClassVar[str] = "Nougat (facebook/nougat-*), Swin encoder + mBART decoder, prompt-free"
    default_num_visual_features: ClassVar[int] = 588
    builds_encoder: ClassVar[bool] = False
    golden_prompt: ClassVar[str | None] = None
    takes_prompt: ClassVar[bool] = False
    tiny_source: ClassVar[str | None] = "tiny://nougat"
    encoder_input_formula: ClassVar[str] = "max_batch_size x num_visual_features"
    visual_placement: ClassVar[VisualPlacement] = VisualPlacement.CROSS_ATTENTION
    # The Swin encoder, and the projection to the decoder's width when the two differ.
    visual_weight_prefixes: ClassVar[tuple[str, ...]] = ("encoder.", "enc_to_dec_proj.")
    llm_config_keys: ClassVar[tuple[str, ...]] = ("decoder",)

    def encoder_input_len(self, spec: BuildSpec, num_visual_features: int) -> int:
        return spec.limits.max_batch_size * num_visual_features

    def convert_model_type(self, ctx: PlanContext) -> str:
        return "bart"

    def convert_extra_args(self, ctx: PlanContext) -> list[str]:
        return ["--nougat"]

    def visual_model_type(self, ctx: PlanContext) -> str:
        return "nougat"

    # --- hf toolchain -----------------------------------------------------------------------

    def make_tiny(self, out_dir: Path, seed: int = 0) -> None:
        from transformers import VisionEncoderDecoderModel

        from vlmforge.families.tinykit import BOS_ID
        from vlmforge.modeling.devices import seed_all

        seed_all(seed)
        model = VisionEncoderDecoderModel(config=_tiny_config()).eval()
        model.generation_config.decoder_start_token_id = BOS_ID
        model.generation_config.forced_eos_token_id = None
        model.save_pretrained(out_dir)
        _tiny_processor().save_pretrained(out_dir)

    def hf_model_class(self) -> type:
        from transformers import VisionEncoderDecoderModel

        return VisionEncoderDecoderModel

    def architecture_facts(self, config: dict[str, Any]) -> ArchitectureFacts:
        """Encoder states: (H/patch)/2^(stages-1) x (W/patch)/2^(stages-1) (nougat-base: 28 x 21 = 588);
        the decoder's attention heads."""
        from transformers import VisionEncoderDecoderConfig

        cfg = VisionEncoderDecoderConfig.from_dict(dict(config))
        encoder = cfg.encoder
        size = encoder.image_size
        height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        patch = encoder.patch_size
        patch_h, patch_w = (patch, patch) if isinstance(patch, int) else (int(patch[0]), int(patch[1]))
        merge = 2 ** (len(encoder.depths) - 1)  # every Swin stage but the last halves both sides
        features = (height // patch_h // merge) * (width // patch_w // merge)
        return ArchitectureFacts(features, cfg.decoder.decoder_attention_heads)

    def format_prompt(self, text: str | None, num_images: int = 1) -> str | None:
        """Always None: Nougat reads the page (one image) without a prompt (given text is ignored)."""
        self.check_image_count(num_images)
        if text is not None:
            logger.warning("nougat takes no prompt: ignoring %r", text)
        return None

    def visual_module(self, model: Any) -> torch.nn.Module:
        return _visual_module_class()(model).eval()

    def extract_llm(self, model: Any) -> Any:
        """``model.decoder`` (an ``MBartForCausalLM`` with cross-attention, shared with the full model),
        its generation config given the full model's start and end tokens."""
        llm = model.decoder
        for key in ("decoder_start_token_id", "bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(model.generation_config, key, None)
            if value is None:
                value = getattr(model.config, key, None)
            setattr(llm.generation_config, key, value)
        llm.config.decoder_start_token_id = llm.generation_config.decoder_start_token_id
        return llm.eval()

    def llm_class(self) -> type:
        from transformers import MBartForCausalLM

        return MBartForCausalLM

    def reference_generate(self, model: Any, processor: Any, image: Image.Image | Sequence[Image.Image],
                           prompt: str | None, max_new_tokens: int) -> GenResult:
        from vlmforge.modeling.generation import ref_generate

        images = self.image_list(image)
        self.format_prompt(prompt)
        inputs = {"pixel_values": self.pixel_values(processor, images)}
        return ref_generate(model, inputs, max_new_tokens)
