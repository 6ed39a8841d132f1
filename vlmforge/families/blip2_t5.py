"""BLIP-2 with a Flan-T5 language model (Salesforce/blip2-flan-t5-*): an encoder-decoder LLM.

The query features are the first rows of the T5 *encoder's* input (the text ids follow, ending with
</s>; T5 has no BOS); the decoder starts from decoder_start_token_id (pad). Everything else of the
hf toolchain is shared with blip2-opt (:class:`vlmforge.families.blip2_opt.Blip2Common`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from vlmforge.families import register_family
from vlmforge.families.base import EncoderDecoderFamily
from vlmforge.families.blip2_opt import TINY_NUM_ATTENTION_HEADS, TINY_VOCAB_SIZE, Blip2Common
from vlmforge.plans.model import PlanContext
from vlmforge.specs.schema import BuildSpec, Dialect
from vlmforge.specs.visual import VisualPlacement

if TYPE_CHECKING:
    from vlmforge.families.contract import ImageFeatures
    from vlmforge.modeling.generation import LlmPrefix


@register_family
class Blip2T5Family(Blip2Common, EncoderDecoderFamily):
    """BLIP-2 T5: the query embeddings are the first rows of the T5 encoder's input."""

    name: ClassVar[str] = "blip2-t5"
    description: ClassVar[str] = "BLIP-2 with Flan-T5 (Salesforce/blip2-flan-t5-*), encoder-decoder"
    context_fmha_disable: ClassVar[bool] = True
    tiny_source: ClassVar[str | None] = "tiny://blip2-t5"
    tokenizer_template: ClassVar[str] = "eos"
    legacy_llm_repos: ClassVar[dict[str, str]] = {
        "flan-t5-xl": "google/flan-t5-xl",
        "flan-t5-xxl": "google/flan-t5-xxl",
    }
    encoder_input_formula: ClassVar[str] = "max_input_len (the T5 encoder reads visual and text tokens)"
    visual_placement: ClassVar[VisualPlacement] = VisualPlacement.ENCODER_INPUT

    def encoder_input_len(self, spec: BuildSpec, num_visual_features: int) -> int:
        return spec.limits.max_input_len

    def convert_model_type(self, ctx: PlanContext) -> str:
        return "t5" if ctx.dialect.dialect is Dialect.V0_9 else "blip2"

    def convert_extra_args(self, ctx: PlanContext) -> list[str]:
        if ctx.dialect.dialect is Dialect.V0_9:
            return ["--max_multimodal_len", str(ctx.derived.max_multimodal_len)]
        return []

    # --- hf toolchain -----------------------------------------------------------------------

    def _tiny_text_config(self) -> Any:
        from transformers import T5Config

        from vlmforge.families.tinykit import EOS_ID, PAD_ID

        return T5Config(
            vocab_size=TINY_VOCAB_SIZE,
            d_model=64,
            d_kv=16,
            d_ff=128,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=TINY_NUM_ATTENTION_HEADS,
            feed_forward_proj="gated-gelu",  # flan-t5 style
            tie_word_embeddings=False,
            pad_token_id=PAD_ID,
            eos_token_id=EOS_ID,
            decoder_start_token_id=PAD_ID,
            initializer_factor=1.0,
        )

    def format_prompt(self, text: str | None, num_images: int = 1) -> str | None:
        """The text as it is; None becomes the golden prompt (T5 has no BOS to caption from)."""
        self.check_image_count(num_images)
        return self.golden_prompt if text is None else text

    def llm_class(self) -> type:
        from transformers import T5ForConditionalGeneration

        return T5ForConditionalGeneration

    def llm_prefix(self, llm: Any, processor: Any, features: ImageFeatures, prompt: str | None) -> LlmPrefix:
        from vlmforge.modeling.generation import LlmPrefix, eos_ids

        embeds, mask = self._llm_inputs(llm, processor, features, self.format_prompt(prompt))
        gen = llm.generation_config
        start = gen.decoder_start_token_id if gen.decoder_start_token_id is not None else llm.config.decoder_start_token_id
        eos = gen.eos_token_id if gen.eos_token_id is not None else llm.config.eos_token_id
        return LlmPrefix("seq2seq", embeds, mask, eos_ids(eos), start=start)
