"""Phi-3-vision (microsoft/Phi-3-vision-128k-instruct): CLIP ViT-L/14-336 HD crops + Phi-3-mini, remote code.

Plan-only: the checkpoint is ``Phi3VForCausalLM`` with its own model and processor code (``trust_remote_code``);
transformers has no Phi-3-vision class. The plan is the 1.2 README's: ``../phi/convert_checkpoint.py``,
``trtllm-build`` with the attention and gemm plugins, ``build_multimodal_engine.py --model_type phi-3-vision`` (it
writes only ``config.json``: 1.2's runner runs the vision tower in PyTorch, from the checkpoint's code) and
``run.py --kv_cache_free_gpu_memory_fraction 0.7``.

Tokens (the checkpoint's ``Phi3VImageProcessor``): an image is scaled onto r x c crops of 336 pixels with r x c at
most ``num_crops`` (16), and gives 144 tokens per crop and for the global view, one separator and 12 newlines per crop
row and for the global view: 144 (rc + 1) + 1 + 12 (r + 1). The most is an image at least 16 times taller than wide
(16 x 1 crops): 17 x 144 + 1 + 17 x 12 = 2653 (the README budgets ``--max_multimodal_len 4096``, its max_input_len).
"""

from __future__ import annotations

from typing import ClassVar

from vlmforge.families import register_family
from vlmforge.families.release_llm import RemoteCodeFamily
from vlmforge.plans.model import PlanContext
from vlmforge.specs.schema import BuildSpec, ImageSize
from vlmforge.specs.visual import FamilyNumber

NUM_CROPS = 16
"""preprocessor_config.json num_crops of Phi-3-vision-128k-instruct (recalled, not read here: no hub)."""
CROP_TOKENS = 144
"""(336 / 14)^2 = 576 patches of a crop, merged 2x2."""
ROW_TOKENS = 12


def hd_tokens(rows: int, cols: int) -> int:
    """Tokens of an image on ``rows`` x ``cols`` crops (Phi3VImageProcessor.calc_num_image_tokens)."""
    return (rows * cols + 1) * CROP_TOKENS + 1 + (rows + 1) * ROW_TOKENS


MAX_TOKENS = max(hd_tokens(r, c) for r in range(1, NUM_CROPS + 1) for c in range(1, NUM_CROPS // r + 1))


@register_family
class Phi3VisionFamily(RemoteCodeFamily):
    """Phi-3-vision: HD crops (their count depends on the image's shape) budgeted at the most any image gives."""

    name: ClassVar[str] = "phi3_vision"
    description: ClassVar[str] = "Phi-3-vision (microsoft/Phi-3-vision-128k-instruct), CLIP HD crops + Phi-3 (remote code)"
    builder_model_type: ClassVar[str] = "phi-3-vision"
    default_num_visual_features: ClassVar[int] = MAX_TOKENS
    llm_kind: ClassVar[str] = "phi"
    resized_to_one_size: ClassVar[bool] = False
    remote_code_reason: ClassVar[str] = (
        "Phi-3-vision checkpoints are Phi3VForCausalLM with their own model and processor code (trust_remote_code); "
        "transformers has no Phi-3-vision class, and TensorRT-LLM 1.2's runner runs its vision tower from that code")
    token_formula: ClassVar[str] = (
        f"phi-3-vision HD crops (num_crops {NUM_CROPS}): 144 x (r x c + 1) + 1 + 12 x (r + 1) for r x c crops of 336 "
        f"pixels, r x c <= {NUM_CROPS}; the most at {NUM_CROPS} x 1 (an image 16 times taller than wide) = {MAX_TOKENS}")

    def visual_numbers(self, spec: BuildSpec, size: ImageSize | None) -> tuple[FamilyNumber, ...]:
        return (FamilyNumber("hd_crops_per_image", NUM_CROPS, "preprocessor_config.json num_crops",
                             "336-pixel crops of one image at most (plus its global view)"),)

    def validate_args(self, ctx: PlanContext) -> list[str]:
        return ["--kv_cache_free_gpu_memory_fraction", "0.7"]
