"""Kosmos-2 (microsoft/kosmos-2-patch14-224): CLIP-like ViT-L/14 at 224 + an image-to-text projection whose 64 latent
queries cross-attend to the patches, giving a fixed 64 rows, placed in the prompt where ``image_embeds_position_mask``
says (between ``<image>`` and ``</image>``, after ``<s>``; Kosmos2Processor).

The text model has its own positions: sinusoidal, offset by the padding id (a fairseq/M2M100 table whose row
``padding_idx`` is zero): position i of a request is row ``padding_idx + 1 + i``. Fed ``inputs_embeds`` alone it counts
them itself, but an explicit ``position_ids`` (the runner's left-padded batches pass 0-based ones) is indexed raw, one
row too low for every token. The LLM here is :func:`image_text_lm_class`: transformers' ``Kosmos2TextForCausalLM`` that
takes 0-based position ids like every other LLM and shifts them by ``padding_idx + 1``; without position ids it is
transformers' own. It is fed unscaled embeddings with the image rows spliced in (the text model scales both by
sqrt(embed_dim) as the full model does).

TensorRT-LLM 1.2: ``../gpt/convert_checkpoint.py --gpt_variant kosmos-2``, ``build_multimodal_engine.py --model_type
kosmos-2`` (vision tower, post_layernorm, L2 normalisation, projection: [B, 3, 224, 224] -> [B, 64, hidden]), the
README's trtllm-build flags. The seed's dialect (0.9) is refused (no Kosmos-2 section in the seed README).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from vlmforge.families import register_family
from vlmforge.families.base import ArchitectureFacts
from vlmforge.families.release_llm import GptVariantFamily

if TYPE_CHECKING:
    from collections.abc import Sequence

    import torch

    from vlmforge.families.contract import ImageFeatures
    from vlmforge.modeling.generation import LlmPrefix

LATENT_QUERIES = 64
"""latent_query_num of kosmos-2-patch14-224 (transformers' Kosmos2Config default): the image rows of every image."""
DEFAULT_USER_TEXT = "<grounding>An image of"
"""The prompt of the model card and of 1.2's run.py for kosmos-2."""
TINY_SOURCE = "tiny://kosmos-2"
TINY_IMAGE_SIZE = 28
TINY_INIT = 0.1
TINY_PROJECTION_INIT = 0.5
TINY_DENSE_INIT = 2.0
"""Stds of the tiny projection's matrices (its latent queries start at TINY_INIT, not 1): the rows carry the image
(the L2-normalised patches through a large dense layer) more than the queries, at about the scaled text embeddings'
size, so a wrong image moves the logits."""
"""initializer_range of the tiny model: transformers' 0.02 leaves logits too flat for a wrong image to move them."""


@cache
def image_text_lm_class() -> type:
    """``Kosmos2TextForCausalLM`` taking 0-based ``position_ids`` (shifted here by ``padding_idx + 1`` onto its
    sinusoidal table's rows); without them it is transformers' own (its table counts from ``padding_idx + 1``)."""
    import inspect

    from transformers.models.kosmos2.modeling_kosmos2 import Kosmos2TextForCausalLM

    class Kosmos2ImageTextLM(Kosmos2TextForCausalLM):
        """The text model of Kosmos-2, fed prompt embeddings with the image rows spliced in."""

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            positions = kwargs.get("position_ids")
            if positions is not None:
                kwargs["position_ids"] = positions + (self.config.pad_token_id + 1)
            return super().forward(*args, **kwargs)

    # the parent's signature: the runner reads ``cache``/``past_key_values`` and ``logits_to_keep`` from it
    Kosmos2ImageTextLM.forward.__signature__ = inspect.signature(Kosmos2TextForCausalLM.forward)  # type: ignore[attr-defined]
    return Kosmos2ImageTextLM


@register_family
class Kosmos2Family(GptVariantFamily):
    """Kosmos-2: 64 latent-query rows per image in the prompt, a sinusoidally positioned text decoder."""

    quantizable: ClassVar[bool] = True
    name: ClassVar[str] = "kosmos2"
    description: ClassVar[str] = "Kosmos-2 (microsoft/kosmos-2-patch14-224), ViT-L/14 + 64 latent queries"
    builder_model_type: ClassVar[str] = "kosmos-2"
    hf_class: ClassVar[str] = "Kosmos2ForConditionalGeneration"
    gpt_variant: ClassVar[str] = "kosmos-2"
    readme_section: ClassVar[str] = "Kosmos-2"
    default_num_visual_features: ClassVar[int] = LATENT_QUERIES
    hf_supported: ClassVar[bool] = True
    hf_unsupported_reason: ClassVar[str] = ""
    tiny_source: ClassVar[str | None] = TINY_SOURCE
    golden_prompt: ClassVar[str | None] = DEFAULT_USER_TEXT
    visual_weight_prefixes: ClassVar[tuple[str, ...]] = ("vision_model.", "image_to_text_projection.")
    llm_config_keys: ClassVar[tuple[str, ...]] = ("text_config",)

    # --- hf toolchain -----------------------------------------------------------------------

    def make_tiny(self, out_dir: Path, seed: int = 0) -> None:
        import torch
        from transformers import Kosmos2ForConditionalGeneration

        from vlmforge.modeling.devices import seed_all

        processor = _tiny_processor()
        seed_all(seed)
        model = Kosmos2ForConditionalGeneration(_tiny_config(processor.tokenizer)).eval()
        with torch.no_grad():
            projection = model.image_to_text_projection
            projection.dense.weight.normal_(0.0, TINY_DENSE_INIT)
            projection.latent_query.normal_(0.0, TINY_INIT)
            projection.x_attn.out_proj.weight.normal_(0.0, TINY_PROJECTION_INIT)
        model.save_pretrained(out_dir)
        processor.save_pretrained(out_dir)

    def hf_model_class(self) -> type:
        from transformers import Kosmos2ForConditionalGeneration

        return Kosmos2ForConditionalGeneration

    def architecture_facts(self, config: dict[str, Any]) -> ArchitectureFacts:
        """latent_query_num (64) and the text model's attention heads."""
        text = config.get("text_config") or {}
        return ArchitectureFacts(int(config.get("latent_query_num", LATENT_QUERIES)),
                                 int(text.get("attention_heads", 32)))

    def format_prompt(self, text: str | None, num_images: int = 1) -> str | None:
        """The text as it is (Kosmos2Processor adds ``<s><image>...</image>``); None: ``<grounding>An image of``."""
        self.check_image_count(num_images)
        return DEFAULT_USER_TEXT if text is None else text

    def visual_module(self, model: Any) -> torch.nn.Module:
        return _visual_module_class()(model).eval()

    def extract_llm(self, model: Any) -> Any:
        """:func:`image_text_lm_class` around the full model's own text decoder and head (shared, not copied)."""
        import copy

        import torch

        from vlmforge.modeling.devices import model_dtype

        text = model.text_model
        config = copy.deepcopy(text.config)
        config.dtype = model_dtype(text)
        config.architectures = [image_text_lm_class().__name__]
        with torch.device("meta"):
            llm = image_text_lm_class()(config)
        llm.model, llm.lm_head = text.model, text.lm_head
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(model.generation_config, key, None)
            setattr(llm.generation_config, key, value if value is not None else getattr(config, key, None))
        return llm.eval()

    def llm_class(self) -> type:
        return image_text_lm_class()

    def _prompt_ids(self, processor: Any, prompt: str | None, count: int) -> tuple[Any, Any]:
        """Kosmos2Processor's ids and ``image_embeds_position_mask`` for one image of ``count`` rows: ``<s>``,
        ``<image>``, ``count`` placeholder ids, ``</image>``, the text (its own ``preprocess_examples``)."""
        import torch

        text = self.format_prompt(prompt)
        prepared = processor.preprocess_examples(text, [True], num_image_tokens=count)  # any image: its placeholders
        ids = processor.tokenizer(f"{processor.tokenizer.bos_token}{prepared}", add_special_tokens=False).input_ids
        first = processor.tokenizer.unk_token_id + 1  # the processor's first_image_token_id
        ids = ids[:2] + list(range(first, first + count)) + ids[2 + count:]
        mask = [0, 0] + [1] * count + [0] * (len(ids) - 2 - count)
        return torch.tensor([ids]), torch.tensor([mask], dtype=torch.bool)

    def prompt_length(self, processor: Any, prompt: str | None, num_visual_features: int | Sequence[int]) -> int:
        return int(self._prompt_ids(processor, prompt, self.visual_counts(num_visual_features)[0])[0].shape[1])

    def llm_prefix(self, llm: Any, processor: Any, features: ImageFeatures, prompt: str | None) -> LlmPrefix:
        """The prompt's (unscaled) token embeddings, the image's rows where ``image_embeds_position_mask`` is 1."""
        import torch

        from vlmforge.modeling.devices import model_device
        from vlmforge.modeling.generation import LlmPrefix, eos_ids

        rows = self.image_features(features)[0]
        device = model_device(llm)
        ids, where = self._prompt_ids(processor, prompt, int(rows.shape[1]))
        ids, where = ids.to(device), where.to(device)
        embeds = llm.get_input_embeddings()(ids)
        embeds = embeds.masked_scatter(where.unsqueeze(-1), rows.to(device, embeds.dtype))
        eos = llm.generation_config.eos_token_id
        eos = eos if eos is not None else llm.config.eos_token_id
        return LlmPrefix("decoder", embeds, torch.ones_like(ids), eos_ids(eos))


@cache
def _visual_module_class() -> type:
    import torch

    class Kosmos2VisualModule(torch.nn.Module):
        """pixel_values [B, 3, S, S] -> image rows [B, latent_query_num, hidden] (``get_image_features``: the tower's
        last hidden state through post_layernorm, L2-normalised, through the latent-query projection; 1.2's export)."""

        def __init__(self, model: Any) -> None:
            super().__init__()
            self.vision_model = model.vision_model
            self.projection = model.image_to_text_projection

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            hidden = self.vision_model(pixel_values=pixel_values.to(self.projection.dense.weight.dtype),
                                       return_dict=True).last_hidden_state
            hidden = torch.nn.functional.normalize(self.vision_model.model.post_layernorm(hidden), dim=-1)
            return self.projection(hidden)[0]

    return Kosmos2VisualModule


def _tiny_processor() -> Any:
    from transformers import Kosmos2Processor

    from vlmforge.families.tinykit import make_fast_tokenizer, pil_image_processor

    image_processor = pil_image_processor("CLIPImageProcessor", size={"shortest_edge": TINY_IMAGE_SIZE},
                                          crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE})
    return Kosmos2Processor(image_processor=image_processor,
                            tokenizer=make_fast_tokenizer(template="bos", image_token=False),
                            num_patch_index_tokens=4)


def _tiny_config(tokenizer: Any) -> Any:
    from transformers import Kosmos2Config

    from vlmforge.families.tinykit import BOS_ID, EOS_ID, PAD_ID

    return Kosmos2Config(
        text_config={"vocab_size": len(tokenizer), "embed_dim": 64, "layers": 2, "attention_heads": 4, "ffn_dim": 128,
                     "max_position_embeddings": 256, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID,
                     "pad_token_id": PAD_ID, "init_std": TINY_INIT},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": TINY_IMAGE_SIZE, "patch_size": 14},
        latent_query_num=LATENT_QUERIES)
