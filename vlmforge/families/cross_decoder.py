"""Encoder-decoder families whose decoder starts from its start token alone and cross-attends to one image's encoder
states (Nougat, Pix2Struct): their prompt length and LLM prefix, said once."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from vlmforge.families.base import EncoderDecoderFamily

if TYPE_CHECKING:
    from vlmforge.families.contract import ImageFeatures
    from vlmforge.modeling.generation import LlmPrefix


class CrossAttentionDecoderFamily(EncoderDecoderFamily):
    """The visual module is the encoder; the LLM is its decoder, fed no text."""

    def prompt_length(self, processor: Any, prompt: str | None, num_visual_features: int | Sequence[int]) -> int:
        """The encoder states the decoder attends to (no text: the decoder starts from its start token alone)."""
        (count,) = self.visual_counts(num_visual_features)
        return count

    def llm_prefix(self, llm: Any, processor: Any, features: ImageFeatures, prompt: str | None) -> LlmPrefix:
        """The decoder from its start token, cross-attending to the image's encoder states."""
        from vlmforge.modeling.generation import cross_attention_prefix

        (features,) = self.image_features(features)
        self.format_prompt(prompt)
        return cross_attention_prefix(llm, features, self.name)
