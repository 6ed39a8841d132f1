"""BLIP-2 with a Flan-T5 language model (Salesforce/blip2-flan-t5-*): an encoder-decoder LLM."""

from __future__ import annotations

from typing import ClassVar

from vlmforge.families import register_family
from vlmforge.families.base import EncoderDecoderFamily
from vlmforge.families.blip2_opt import Blip2Common
from vlmforge.plan import PlanContext
from vlmforge.spec import BuildSpec, Dialect


@register_family
class Blip2T5Family(Blip2Common, EncoderDecoderFamily):
    """BLIP-2 T5: the query embeddings are the first rows of the T5 encoder's input."""

    name: ClassVar[str] = "blip2-t5"
    description: ClassVar[str] = "BLIP-2 with Flan-T5 (Salesforce/blip2-flan-t5-*), encoder-decoder"
    context_fmha_disable: ClassVar[bool] = True
    tiny_source: ClassVar[str | None] = "tiny://blip2-t5"
    legacy_llm_repos: ClassVar[dict[str, str]] = {
        "flan-t5-xl": "google/flan-t5-xl",
        "flan-t5-xxl": "google/flan-t5-xxl",
    }
    encoder_input_formula: ClassVar[str] = "max_input_len (the T5 encoder reads visual and text tokens)"

    def encoder_input_len(self, spec: BuildSpec, num_visual_features: int) -> int:
        return spec.limits.max_input_len

    def convert_model_type(self, ctx: PlanContext) -> str:
        return "t5" if ctx.dialect.dialect is Dialect.V0_9 else "blip2"

    def convert_extra_args(self, ctx: PlanContext) -> list[str]:
        if ctx.dialect.dialect is Dialect.V0_9:
            return ["--max_multimodal_len", str(ctx.derived.max_multimodal_len)]
        return []
