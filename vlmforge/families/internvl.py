"""InternVL2 (OpenGVLab/InternVL2-1B/2B/4B/8B/26B): InternViT + pixel-shuffle MLP + Qwen2 / InternLM2 / Phi-3 LLM.

Plan-only: the checkpoints are ``InternVLChatModel`` with their own code (``trust_remote_code``), and TensorRT-LLM
1.2's README pins ``transformers==4.37.2`` for them. transformers 5's ``InternVLForConditionalGeneration`` reads only
the converted "-hf" layout (OpenGVLab/InternVL*-hf repositories), not these checkpoints.

The plan is the 1.2 README's: ``pip install transformers==4.37.2``; the LLM converted by the script its size names
(1B: ``../qwen``, 2B/8B/26B: ``../internlm2``, 4B: ``../phi``); ``trtllm-build --gemm_plugin auto``;
``build_multimodal_engine.py --model_type internvl`` (the builder multiplies its ``--max_batch_size`` by the config's
``max_dynamic_patch``, so the visual batch counts images); ``run.py --image_path`` the checkpoint's own example image.
Tokens: each 448x448 tile gives (448/14)^2 x 0.5^2 = 256 tokens after the pixel shuffle, and an image takes at most
``max_dynamic_patch`` (12) tiles + 1 thumbnail: 13 x 256 = 3328, the README's ``--max_multimodal_len``.
"""

from __future__ import annotations

import posixpath
from typing import ClassVar

from vlmforge.errors import SpecError
from vlmforge.families import register_family
from vlmforge.families.release_llm import RemoteCodeFamily
from vlmforge.plans.model import PlanContext, Step
from vlmforge.specs.schema import BuildSpec, ImageSize, parse_source
from vlmforge.specs.visual import FamilyNumber

TILE_TOKENS = 256
"""(448 / 14)^2 patches of one tile, x 0.5^2 by the pixel shuffle (config downsample_ratio 0.5)."""
MAX_TILES = 12 + 1
"""config max_dynamic_patch (12) tiles + the thumbnail (use_thumbnail)."""
TRANSFORMERS_PIN = "transformers==4.37.2"
CONVERTERS = {
    "OpenGVLab/InternVL2-1B": "qwen",
    "OpenGVLab/InternVL2-2B": "internlm2",
    "OpenGVLab/InternVL2-4B": "phi",
    "OpenGVLab/InternVL2-8B": "internlm2",
    "OpenGVLab/InternVL2-26B": "internlm2",
}
"""The README's LLM converter per checkpoint (its llm_config: Qwen2, InternLM2 or Phi-3)."""
EXAMPLE_IMAGE = "examples/image1.jpg"
"""The image the README's run.py step reads, shipped inside every InternVL2 checkpoint."""


@register_family
class InternVLFamily(RemoteCodeFamily):
    """InternVL2: dynamic 448-pixel tiles, 256 tokens each; its LLM converter depends on the checkpoint's size."""

    name: ClassVar[str] = "internvl"
    description: ClassVar[str] = "InternVL2 (OpenGVLab/InternVL2-*), InternViT tiles + Qwen2/InternLM2/Phi-3 (remote code)"
    builder_model_type: ClassVar[str] = "internvl"
    default_num_visual_features: ClassVar[int] = MAX_TILES * TILE_TOKENS
    llm_kind: ClassVar[str] = "internlm2"
    resized_to_one_size: ClassVar[bool] = False
    remote_code_reason: ClassVar[str] = (
        "InternVL2 checkpoints are InternVLChatModel with their own model code (trust_remote_code), and TensorRT-LLM "
        f"1.2's README pins {TRANSFORMERS_PIN} for them (transformers 5's InternVLForConditionalGeneration reads only "
        "the converted '-hf' layout)")
    token_formula: ClassVar[str] = (
        f"internvl: at most {MAX_TILES - 1} tiles (max_dynamic_patch) + 1 thumbnail = {MAX_TILES} tiles x "
        f"(448/14)^2 x 0.5^2 = {TILE_TOKENS} tokens each (the 1.2 README's 3328)")

    def converter_kind(self, spec: BuildSpec) -> str:
        parsed = parse_source(spec.source)
        kind = CONVERTERS.get(parsed.location) if parsed.scheme == "hf" else None
        if kind is None:
            known = ", ".join(f"{repo} ({script})" for repo, script in CONVERTERS.items())
            raise SpecError(
                f"{spec.source}: the 1.2 README converts each InternVL2 checkpoint's LLM with the script of its "
                f"llm_config (Qwen2: ../qwen, InternLM2: ../internlm2, Phi-3: ../phi) and names only {known}; "
                "build one of those (source: hf://<repo>, optionally @revision)", path="source")
        return kind

    def check_spec(self, spec: BuildSpec) -> None:
        super().check_spec(spec)
        self.converter_kind(spec)

    def visual_numbers(self, spec: BuildSpec, size: ImageSize | None) -> tuple[FamilyNumber, ...]:
        return (FamilyNumber("visual_tiles_per_image", MAX_TILES, f"max_dynamic_patch {MAX_TILES - 1} + 1 thumbnail",
                             "448x448 tiles one image takes; the builder's profile holds --max_batch_size x "
                             "max_dynamic_patch tiles"),)

    def fetch_steps(self, ctx: PlanContext) -> list[Step]:
        """The checkpoint, then the README's transformers pin (its converters and builder load the remote code)."""
        install = ctx.step("install-requirements", ["pip", "install", TRANSFORMERS_PIN], tool="pip")
        return super().fetch_steps(ctx) + [install]

    def llm_flags(self, ctx: PlanContext) -> list[str]:
        return ["--gemm_plugin", "auto"]

    def validate_args(self, ctx: PlanContext) -> list[str]:
        return ["--image_path", posixpath.join(ctx.layout.hf_dir, EXAMPLE_IMAGE)]
