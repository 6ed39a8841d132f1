"""InternLM-XComposer2-VL (internlm/internlm-xcomposer2-vl-7b): CLIP ViT-L/14-490 + InternLM2 with Partial-LoRA, remote code.

Plan-only: the checkpoint is ``InternLMXComposer2ForCausalLM`` with its own code (``trust_remote_code``), and
TensorRT-LLM 1.2's README pins ``transformers==4.45.2`` for it (requirements-internlm-xcomposer2.txt). The plan is the
README's: the requirements, ``../internlm2/convert_checkpoint.py`` (which also writes the Partial-LoRA weights as
``adapter_model.bin`` + ``adapter_config.json`` into its working directory, the multimodal example directory), then
``trtllm-build --lora_plugin --lora_dir . --max_lora_rank 256`` reading them from there, ``build_multimodal_engine.py
--model_type internlm-xcomposer2 --max_batch_size 48`` and run.py. Tokens: (490/14)^2 = 1225 per image (the README's
``58800 = 1225 * 48``).
"""

from __future__ import annotations

from typing import ClassVar

from vlmforge.families import register_family
from vlmforge.families.release_llm import RemoteCodeFamily
from vlmforge.plans.model import PlanContext, Step

REQUIREMENTS = "requirements-internlm-xcomposer2.txt"
"""transformers==4.45.2 (read at 1.2-era index commit 2a9abd95)."""
LORA_RANK = 256


@register_family
class InternLMXComposer2Family(RemoteCodeFamily):
    """InternLM-XComposer2-VL: one 490-pixel image, 1225 tokens; its Partial-LoRA served as a LoRA adapter."""

    name: ClassVar[str] = "internlm_xcomposer2"
    description: ClassVar[str] = ("InternLM-XComposer2-VL (internlm/internlm-xcomposer2-vl-7b), CLIP-490 + InternLM2 "
                                  "Partial-LoRA (remote code)")
    builder_model_type: ClassVar[str] = "internlm-xcomposer2"
    default_num_visual_features: ClassVar[int] = 1225
    llm_kind: ClassVar[str] = "internlm2"
    remote_code_reason: ClassVar[str] = (
        "InternLM-XComposer2 checkpoints are InternLMXComposer2ForCausalLM with their own model code "
        "(trust_remote_code), and TensorRT-LLM 1.2's README pins transformers==4.45.2 for them; transformers has no "
        "XComposer2 class")
    token_formula: ClassVar[str] = "internlm-xcomposer2: a 490x490 image, (490/14)^2 = 1225 tokens (the 1.2 README's)"

    def fetch_steps(self, ctx: PlanContext) -> list[Step]:
        """The checkpoint, then the README's requirements (transformers 4.45.2 for the converter and builder)."""
        install = ctx.step("install-requirements", ["pip", "install", "-r", REQUIREMENTS], tool="pip")
        return super().fetch_steps(ctx) + [install]

    def convert_step(self, ctx: PlanContext) -> Step:
        """The README's converter; it also writes the LoRA adapter into its working directory (an output here)."""
        step = super().convert_step(ctx)
        adapter = [f"{step.cwd}/adapter_model.bin", f"{step.cwd}/adapter_config.json"]
        return step.model_copy(update={"outputs": [*step.outputs, *adapter]})

    def llm_flags(self, ctx: PlanContext) -> list[str]:
        dtype = ctx.spec.dtype.value
        return ["--gemm_plugin", dtype, "--lora_plugin", dtype, "--lora_dir", ".", "--max_lora_rank", str(LORA_RANK)]

    def validate_args(self, ctx: PlanContext) -> list[str]:
        return ["--batch_size", "1"]
