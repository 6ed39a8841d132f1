"""Nougat (facebook/nougat-*): a Swin encoder reads the page, an mBART decoder writes markup."""

from __future__ import annotations

from typing import ClassVar

from vlmforge.families import register_family
from vlmforge.families.base import EncoderDecoderFamily
from vlmforge.plan import PlanContext
from vlmforge.spec import BuildSpec


@register_family
class NougatFamily(EncoderDecoderFamily):
    """Nougat: the Swin encoder is the visual engine; only the mBART decoder is a TensorRT-LLM engine."""

    name: ClassVar[str] = "nougat"
    description: ClassVar[str] = "Nougat (facebook/nougat-*), Swin encoder + mBART decoder, prompt-free"
    default_num_visual_features: ClassVar[int] = 588
    builds_encoder: ClassVar[bool] = False
    golden_prompt: ClassVar[str | None] = None
    tiny_source: ClassVar[str | None] = "tiny://nougat"
    encoder_input_formula: ClassVar[str] = "max_batch_size x num_visual_features"

    def encoder_input_len(self, spec: BuildSpec, num_visual_features: int) -> int:
        return spec.limits.max_batch_size * num_visual_features

    def convert_model_type(self, ctx: PlanContext) -> str:
        return "bart"

    def convert_extra_args(self, ctx: PlanContext) -> list[str]:
        return ["--nougat"]

    def visual_model_type(self, ctx: PlanContext) -> str:
        return "nougat"
