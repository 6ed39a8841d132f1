"""LLaVA-1.5 (llava-hf/llava-1.5-*-hf): CLIP ViT-L/14-336 + MLP projector + LLaMA/Vicuna."""

from __future__ import annotations

from typing import ClassVar

from vlmforge.families import register_family
from vlmforge.families.base import DecoderOnlyFamily
from vlmforge.plan import PlanContext


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

    def visual_model_type(self, ctx: PlanContext) -> str:
        return "llava"
