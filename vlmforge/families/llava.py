"""LLaVA-1.5 (llava-hf/llava-1.5-*-hf): CLIP ViT-L/14-336 + MLP projector + LLaMA/Vicuna.

transformers-5 layout of ``LlavaForConditionalGeneration`` (what the hf toolchain takes apart)::

    model.model.vision_tower          CLIPVisionModel
    model.model.multi_modal_projector LlavaMultiModalProjector
    model.model.language_model        LlamaModel (no head)
    model.lm_head                     Linear

torch and transformers are imported inside the hf hooks only: the spec and plan layers import this
module without them.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from vlmforge.families import register_family
from vlmforge.families.base import ArchitectureFacts, DecoderOnlyFamily, expand_image_tokens, wrap_language_model
from vlmforge.plans.model import PlanContext

if TYPE_CHECKING:
    from collections.abc import Sequence

    import torch

    from vlmforge.families.contract import ImageFeatures
    from vlmforge.modeling.generation import LlmPrefix

IMAGE_TOKEN = "<image>"
PROMPT_TEMPLATE = "USER: {images}{text} ASSISTANT:"
"""LLaVA-1.5's conversation format (llava-hf model cards and chat template): ``<image>\\n`` per image, then the text."""
DEFAULT_USER_TEXT = "Describe the image."
"""User text when none is given: LLaVA is a chat model and always needs a request."""

# The tiny test model (tiny://llava): (56/14)^2 = 16 image features (LLaVA-1.5: (336/14)^2 = 576).
TINY_IMAGE_SIZE = 56
TINY_PATCH_SIZE = 14
TINY_VOCAB_SIZE = 320
TINY_NUM_ATTENTION_HEADS = 4


def _tiny_config() -> Any:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    from vlmforge.families.tinykit import BOS_ID, EOS_ID, IMAGE_ID, PAD_ID

    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=TINY_IMAGE_SIZE,
        patch_size=TINY_PATCH_SIZE,
        projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=TINY_NUM_ATTENTION_HEADS,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        initializer_range=0.05,  # > default 0.02 (image features matter more), < 0.1 (random net turns chaotic)
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_ID,
        image_seq_length=(TINY_IMAGE_SIZE // TINY_PATCH_SIZE) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )


def _tiny_processor() -> Any:
    from transformers import LlavaProcessor

    from vlmforge.families.tinykit import make_fast_tokenizer, pil_image_processor

    image_processor = pil_image_processor(
        "CLIPImageProcessor",
        size={"shortest_edge": TINY_IMAGE_SIZE}, crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=make_fast_tokenizer(template="bos", vocab_size=TINY_VOCAB_SIZE),
        patch_size=TINY_PATCH_SIZE,
        vision_feature_select_strategy="default",
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,  # CLIP's CLS token; the "default" strategy drops it again
    )


@cache
def _visual_module_class() -> type:
    import torch

    class LlavaVisualModule(torch.nn.Module):
        """pixel_values [B, 3, H, W] -> projected image features [B, N, llm_hidden] (what the LLM consumes)."""

        def __init__(self, model: Any) -> None:
            super().__init__()
            config = model.config
            self.vision_tower = model.model.vision_tower
            self.projector = model.model.multi_modal_projector
            layer = config.vision_feature_layer
            self.feature_layers = [layer] if isinstance(layer, int) else list(layer)
            self.drop_cls = config.vision_feature_select_strategy == "default"

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            pixel_values = pixel_values.to(self.vision_tower.dtype)
            out = self.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
            features = torch.cat([out.hidden_states[layer] for layer in self.feature_layers], dim=-1)
            if self.drop_cls:
                features = features[:, 1:]
            return self.projector(features)

    return LlavaVisualModule


@register_family
class LlavaFamily(DecoderOnlyFamily):
    """LLaVA: (336/14)^2 = 576 patch features spliced in at the <image> token."""

    name: ClassVar[str] = "llava"
    description: ClassVar[str] = "LLaVA-1.5 (llava-hf/llava-1.5-*-hf), CLIP + LLaMA"
    default_num_visual_features: ClassVar[int] = 576
    llm_kind: ClassVar[str] = "llama"
    fused_mlp_default: ClassVar[bool] = True
    supports_fused_mlp: ClassVar[bool] = True
    tiny_source: ClassVar[str | None] = "tiny://llava"
    quantizable: ClassVar[bool] = True
    # Checkpoints name these without the `model.` of transformers-5's module tree (llava-hf's layout);
    # checkpoints saved with the new layout keep it: both are listed.
    visual_weight_prefixes: ClassVar[tuple[str, ...]] = (
        "vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.",
    )
    llm_config_keys: ClassVar[tuple[str, ...]] = ("text_config",)
    images_per_prompt_limit: ClassVar[int | None] = None  # one <image> per image, each expanded to its features

    def visual_model_type(self, ctx: PlanContext) -> str:
        return "llava"

    # --- hf toolchain -----------------------------------------------------------------------

    def make_tiny(self, out_dir: Path, seed: int = 0) -> None:
        from transformers import LlavaForConditionalGeneration

        from vlmforge.modeling.devices import seed_all

        seed_all(seed)
        model = LlavaForConditionalGeneration(_tiny_config()).eval()
        model.save_pretrained(out_dir)
        _tiny_processor().save_pretrained(out_dir)

    def hf_model_class(self) -> type:
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration

    def architecture_facts(self, config: dict[str, Any]) -> ArchitectureFacts:
        """(image_size / patch_size)^2 patch features (+1 for the "full" strategy, which keeps CLS)."""
        from transformers import LlavaConfig

        cfg = LlavaConfig.from_dict(dict(config))
        vision = cfg.vision_config
        patches = (vision.image_size // vision.patch_size) ** 2
        extra = 1 if cfg.vision_feature_select_strategy == "full" else 0
        return ArchitectureFacts(patches + extra, cfg.text_config.num_attention_heads)

    def format_prompt(self, text: str | None, num_images: int = 1) -> str | None:
        """``USER: <image>\\n{text} ASSISTANT:`` (one ``<image>\\n`` per image, as llava-hf's chat template writes
        them); text that already holds ``<image>`` is kept as it is (its count is checked against the images')."""
        self.check_image_count(num_images)
        text = DEFAULT_USER_TEXT if text is None else text
        if IMAGE_TOKEN in text:
            return text
        return PROMPT_TEMPLATE.format(images=(IMAGE_TOKEN + "\n") * num_images, text=text)

    def visual_module(self, model: Any) -> torch.nn.Module:
        return _visual_module_class()(model).eval()

    def extract_llm(self, model: Any) -> Any:
        """A ``LlamaForCausalLM`` around the full model's own language model and head (shared, not copied)."""
        return wrap_language_model(model, self.causal_lm_class)

    def llm_class(self) -> type:
        from transformers import LlamaForCausalLM

        return LlamaForCausalLM

    def causal_lm_class(self, text_config: Any) -> type:
        """The ``*ForCausalLM`` class :meth:`extract_llm` wraps the language model in, for the checkpoint's text
        config."""
        return self.llm_class()

    def _prompt_ids(self, processor: Any, prompt: str | None, counts: list[int]) -> Any:
        """The prompt's ids, its k-th ``<image>`` expanded to the k-th image's ``counts[k]`` placeholder tokens (what
        LlavaProcessor does)."""
        prompt = self.format_prompt(prompt, len(counts))
        assert prompt is not None
        return expand_image_tokens(processor.tokenizer, prompt, processor.image_token, counts, "LLaVA")

    def prompt_length(self, processor: Any, prompt: str | None, num_visual_features: int | Sequence[int]) -> int:
        return int(self._prompt_ids(processor, prompt, self.visual_counts(num_visual_features)).shape[1])

    def llm_prefix(self, llm: Any, processor: Any, features: ImageFeatures, prompt: str | None) -> LlmPrefix:
        """Token embeddings of the prompt, each <image> expanded to its image's feature rows and replaced by them
        (the images in order, as LlavaForConditionalGeneration scatters them)."""
        import torch

        from vlmforge.modeling.devices import model_device
        from vlmforge.modeling.generation import LlmPrefix, eos_ids

        parts = self.image_features(features)
        device = model_device(llm)
        ids = self._prompt_ids(processor, prompt, [int(part.shape[1]) for part in parts]).to(device)
        embeds = llm.get_input_embeddings()(ids)
        mask = (ids == processor.image_token_id).unsqueeze(-1)
        rows = torch.cat([part.to(device, embeds.dtype) for part in parts], dim=1)
        embeds = embeds.masked_scatter(mask, rows)
        eos = llm.generation_config.eos_token_id
        eos = eos if eos is not None else llm.config.eos_token_id
        return LlmPrefix("decoder", embeds, torch.ones_like(ids), eos_ids(eos))

