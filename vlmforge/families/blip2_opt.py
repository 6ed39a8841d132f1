"""BLIP-2 with an OPT language model (Salesforce/blip2-opt-*): 32 Q-Former query tokens per image.

transformers-5 layout of ``Blip2ForConditionalGeneration`` (shared with blip2-t5)::

    model.vision_model         Blip2VisionModel
    model.query_tokens         Parameter [1, num_query_tokens, qformer_hidden]
    model.qformer              Blip2QFormerModel (kept in float32: _keep_in_fp32_modules)
    model.language_projection  Linear(qformer_hidden -> text_hidden)
    model.language_model       OPTForCausalLM / T5ForConditionalGeneration (complete, with its head)

``Blip2Processor`` puts num_query_tokens x ``<image>`` before the text ids (before OPT's BOS); the
model scatters the projected query outputs into those positions. torch and transformers are
imported inside the hf hooks only: the spec and plan layers import this module without them.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from vlmforge.errors import PlanError
from vlmforge.families import register_family
from vlmforge.families.base import ArchitectureFacts, DecoderOnlyFamily, ModelFamily
from vlmforge.plans.model import PlanContext, Step
from vlmforge.specs.schema import Dialect, parse_source

if TYPE_CHECKING:
    from collections.abc import Sequence

    import torch

    from vlmforge.families.contract import ImageFeatures
    from vlmforge.families.tinykit import Template
    from vlmforge.modeling.generation import LlmPrefix

# The tiny test models (tiny://blip2-opt, tiny://blip2-t5): 16 patches + CLS into the Q-Former's
# cross-attention, 32 query tokens like the real BLIP-2.
TINY_IMAGE_SIZE = 32
TINY_PATCH_SIZE = 8
TINY_NUM_QUERY_TOKENS = 32
TINY_VOCAB_SIZE = 320
TINY_NUM_ATTENTION_HEADS = 4


def _tiny_vision_qformer_configs() -> tuple[Any, Any]:
    from transformers import Blip2QFormerConfig, Blip2VisionConfig

    vision = Blip2VisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=TINY_IMAGE_SIZE,
        patch_size=TINY_PATCH_SIZE,
        initializer_range=0.2,  # Blip2VisionConfig's default 1e-10 gives image-independent random features
    )
    qformer = Blip2QFormerConfig(
        vocab_size=64,  # unused for generation (no text goes into the Q-Former) but allocated
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        cross_attention_frequency=1,
        encoder_hidden_size=32,
        initializer_range=0.2,
    )
    return vision, qformer


@cache
def _visual_module_class() -> type:
    import torch

    class Blip2VisualModule(torch.nn.Module):
        """pixel_values [B, 3, H, W] -> projected query features [B, num_query_tokens, llm_hidden]."""

        def __init__(self, model: Any) -> None:
            super().__init__()
            self.vision_model = model.vision_model
            self.query_tokens = model.query_tokens
            self.qformer = model.qformer
            self.language_projection = model.language_projection

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            pixel_values = pixel_values.to(self.vision_model.dtype)
            image_embeds = self.vision_model(pixel_values, return_dict=True).last_hidden_state
            image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
            query = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
            out = self.qformer(query_embeds=query, encoder_hidden_states=image_embeds,
                               encoder_attention_mask=image_mask, return_dict=True).last_hidden_state
            # the Q-Former is kept in float32: back to the vision dtype, as the model does
            return self.language_projection(out.to(image_embeds.dtype))

    return Blip2VisualModule


class Blip2Common(ModelFamily):
    """What both BLIP-2 families share: the Q-Former's query tokens and the seed's naming."""

    default_num_visual_features: ClassVar[int] = 32
    legacy_llm_repos: ClassVar[dict[str, str]] = {}
    """0.9 dialect: BLIP-2 variant -> the LLM-only repository the seed clones (its visual builder knows only these)."""
    tokenizer_template: ClassVar[str] = "bos"
    """Post-processing of the tiny tokenizer: OPT prepends BOS, T5 appends EOS."""
    visual_weight_prefixes: ClassVar[tuple[str, ...]] = ("vision_model.", "qformer.", "query_tokens", "language_projection.")
    llm_config_keys: ClassVar[tuple[str, ...]] = ("text_config",)

    def legacy_variant(self, ctx: PlanContext) -> str:
        """The seed's MODEL_NAME (opt-2.7b, flan-t5-xl): its visual --model_type and its LLM repository."""
        source = parse_source(ctx.spec.source)
        variant = source.location.rsplit("/", 1)[-1].removeprefix("blip2-") if source.scheme == "hf" else ""
        if variant not in self.legacy_llm_repos:
            raise PlanError(
                f"dialect 0.9: build_visual_engine.py knows {self.name} only as "
                f"{', '.join(sorted(self.legacy_llm_repos))} (from hf://Salesforce/blip2-<variant>); "
                f"{ctx.spec.source} is none of them: use dialect 1.2 (--dialect 1.2)"
            )
        return variant

    def visual_model_type(self, ctx: PlanContext) -> str:
        return self.legacy_variant(ctx) if ctx.dialect.dialect is Dialect.V0_9 else "blip2"

    def fetch_steps(self, ctx: PlanContext) -> list[Step]:
        if ctx.dialect.dialect is not Dialect.V0_9:
            return super().fetch_steps(ctx)
        repo = self.legacy_llm_repos[self.legacy_variant(ctx)]
        hf_dir = ctx.layout.hf_dir
        return [ctx.step("fetch", ["git", "clone", "--", f"https://huggingface.co/{repo}", hf_dir], tool="git", outputs=[hf_dir])]

    # --- hf toolchain (shared by both BLIP-2 families) ---------------------------------------

    def _tiny_text_config(self) -> Any:
        """The tiny model's language-model config (OPT or T5)."""
        raise NotImplementedError

    def _tiny_config(self) -> Any:
        from transformers import Blip2Config

        from vlmforge.families.tinykit import IMAGE_ID

        vision, qformer = _tiny_vision_qformer_configs()
        return Blip2Config(  # sub-configs as dicts: transformers 4.57's Blip2Config takes only those
            vision_config=vision.to_dict(),
            qformer_config=qformer.to_dict(),
            text_config=self._tiny_text_config().to_dict(),
            num_query_tokens=TINY_NUM_QUERY_TOKENS,
            image_token_index=IMAGE_ID,
            initializer_range=0.2,  # query_tokens (re-drawn in make_tiny) and language_projection
        )

    def _tiny_processor(self) -> Any:
        from transformers import Blip2Processor

        from vlmforge.families.tinykit import make_fast_tokenizer, pil_image_processor

        template: Template = "eos" if self.tokenizer_template == "eos" else "bos"
        image_processor = pil_image_processor("BlipImageProcessor", size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE})
        # No `image_token` attribute on the tokenizer: Blip2Processor (transformers 5.24) would then use
        # tokenizer.image_token (a str) and crash on `.content`; the processor owns "<image>".
        tokenizer = make_fast_tokenizer(template=template, vocab_size=TINY_VOCAB_SIZE, image_token=False)
        return Blip2Processor(image_processor=image_processor, tokenizer=tokenizer,
                              num_query_tokens=TINY_NUM_QUERY_TOKENS)

    def make_tiny(self, out_dir: Path, seed: int = 0) -> None:
        import torch
        from transformers import Blip2ForConditionalGeneration

        from vlmforge.modeling.devices import seed_all

        seed_all(seed)
        model = Blip2ForConditionalGeneration(self._tiny_config()).eval()
        # HF's init zeroes query_tokens: every query output would be the same (a degenerate test model,
        # and a float16 LayerNorm of a zero-variance row is 0/0). Draw them like a trained model's.
        with torch.no_grad():
            model.query_tokens.normal_(0.0, model.config.initializer_range)
        model.save_pretrained(out_dir)
        self._tiny_processor().save_pretrained(out_dir)

    def hf_model_class(self) -> type:
        from transformers import Blip2ForConditionalGeneration

        return Blip2ForConditionalGeneration

    def architecture_facts(self, config: dict[str, Any]) -> ArchitectureFacts:
        """num_query_tokens visual features; the language model's attention heads."""
        from transformers import Blip2Config

        cfg = Blip2Config.from_dict(dict(config))
        text = cfg.text_config
        heads = text.num_heads if text.model_type == "t5" else text.num_attention_heads
        return ArchitectureFacts(cfg.num_query_tokens, heads)

    def visual_module(self, model: Any) -> torch.nn.Module:
        return _visual_module_class()(model).eval()

    def extract_llm(self, model: Any) -> Any:
        """``model.language_model`` already is a complete transformers LLM (shared with the full model)."""
        return model.language_model.eval()


    def prompt_length(self, processor: Any, prompt: str | None, num_visual_features: int | Sequence[int]) -> int:
        """Q image rows + the prompt's ids (no prompt: BOS alone)."""
        (count,) = self.visual_counts(num_visual_features)
        prompt = self.format_prompt(prompt)
        return count + (1 if prompt is None else len(processor.tokenizer(prompt).input_ids))

    def _llm_inputs(self, llm: Any, processor: Any, features: ImageFeatures,
                    prompt: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        """[<image>] x Q + the prompt's ids (OPT: BOS first; no prompt: BOS alone), image rows = features (the
        processor puts the query tokens of its one image first)."""
        import torch

        from vlmforge.modeling.devices import model_device

        (features,) = self.image_features(features)
        tokenizer = processor.tokenizer
        image_id = tokenizer.convert_tokens_to_ids(str(processor.image_token))
        if prompt is not None:
            text_ids = list(tokenizer(prompt).input_ids)
        elif llm.config.bos_token_id is not None:
            text_ids = [llm.config.bos_token_id]
        else:
            raise ValueError(f"{self.name} needs a prompt: its language model has no BOS token to start from")
        device = model_device(llm)
        ids = torch.tensor([[image_id] * features.shape[1] + text_ids], dtype=torch.long, device=device)
        embeds = llm.get_input_embeddings()(ids)
        mask = (ids == image_id).unsqueeze(-1)
        embeds = embeds.masked_scatter(mask, features.to(device, embeds.dtype))
        return embeds, torch.ones_like(ids)


@register_family
class Blip2OptFamily(Blip2Common, DecoderOnlyFamily):
    """BLIP-2 OPT: ViT-g + Q-Former, OPT decoder; visual features prepended as a prompt table."""

    name: ClassVar[str] = "blip2-opt"
    description: ClassVar[str] = "BLIP-2 with OPT (Salesforce/blip2-opt-*)"
    llm_kind: ClassVar[str] = "opt"
    emit_beam_width: ClassVar[bool] = True
    tiny_source: ClassVar[str | None] = "tiny://blip2-opt"
    legacy_llm_repos: ClassVar[dict[str, str]] = {"opt-2.7b": "facebook/opt-2.7b", "opt-6.7b": "facebook/opt-6.7b"}
    quantizable: ClassVar[bool] = True

    def convert_extra_args(self, ctx: PlanContext) -> list[str]:
        # 1.2 converts the whole BLIP-2 checkpoint and needs to be told to take its OPT part.
        return [] if ctx.dialect.dialect is Dialect.V0_9 else ["--model_type", "blip2"]

    # --- hf toolchain -----------------------------------------------------------------------

    def _tiny_text_config(self) -> Any:
        from transformers import OPTConfig

        from vlmforge.families.tinykit import BOS_ID, EOS_ID, PAD_ID

        return OPTConfig(
            vocab_size=TINY_VOCAB_SIZE,
            hidden_size=64,
            word_embed_proj_dim=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=TINY_NUM_ATTENTION_HEADS,
            max_position_embeddings=256,
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,
            pad_token_id=PAD_ID,
            init_std=0.05,  # > default 0.02 (image features matter more), < 0.1 (random net turns chaotic)
        )

    def llm_class(self) -> type:
        from transformers import OPTForCausalLM

        return OPTForCausalLM

    def llm_prefix(self, llm: Any, processor: Any, features: ImageFeatures, prompt: str | None) -> LlmPrefix:
        from vlmforge.modeling.generation import LlmPrefix, eos_ids

        embeds, mask = self._llm_inputs(llm, processor, features, self.format_prompt(prompt))
        eos = llm.generation_config.eos_token_id
        return LlmPrefix("decoder", embeds, mask, eos_ids(eos if eos is not None else llm.config.eos_token_id))
