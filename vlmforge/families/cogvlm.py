"""CogVLM (THUDM/cogvlm-chat-hf): EVA2-CLIP-E + a LLaMA with visual-expert weights, remote code, bfloat16 only.

Plan-only: the checkpoint is ``CogVLMForCausalLM`` with its own code (``trust_remote_code``, xformers attention in its
``visual.py``); transformers has no CogVLM class. The plan is the 1.2 README's, step for step: the checkpoint and the
tokenizer it borrows (lmsys/vicuna-7b-v1.5, which run.py reads as ``--hf_model_dir``), the README's ``sed`` on
``visual.py`` (ONNX cannot export ``xops.memory_efficient_attention``: the edit swaps in plain attention, by line
number, so it fits the checkpoint revision the README was written against), ``../../contrib/cogvlm/convert_checkpoint.py
--use_prompt_tuning``, ``trtllm-build`` with its plugin flags (``--paged_kv_cache enable``: deprecated in 1.2 for
``--kv_cache_type paged``, still accepted), ``build_multimodal_engine.py --model_type cogvlm`` and run.py with the
README's sampling flags. Tokens: the README's 1280 per image (``48 (max_batch_size) * 1280 (max_num_visual_features)``);
the 490x490 image's (490/14)^2 = 1225 patches fit in it.
"""

from __future__ import annotations

import posixpath
from typing import ClassVar

from vlmforge.errors import SpecError
from vlmforge.families import register_family
from vlmforge.families.release_llm import RemoteCodeFamily
from vlmforge.plans.model import PlanContext, Step
from vlmforge.specs.schema import BuildSpec, Dtype

TOKENIZER_SOURCE = "hf://lmsys/vicuna-7b-v1.5"
"""The tokenizer the README pairs with cogvlm-chat-hf (run.py's --hf_model_dir)."""
VISUAL_PATCH = ("4s/.*//;40s/.*/        out = self.attention(q.transpose(1, 2), k.transpose(1, 2), "
                "v.transpose(1, 2)).transpose(1, 2).contiguous()/;41s/.*//;42s/.*//")
"""The README's sed script on visual.py: drops the xformers import and its memory_efficient_attention call."""
RUN_FLAGS = ("--batch_size", "1", "--top_p", "0.4", "--top_k", "1", "--temperature", "0.2", "--repetition_penalty",
             "1.2", "--enable_context_fmha_fp32_acc")
"""run.py's README flags beside the text, model and engine (top_k 1: greedy)."""


@register_family
class CogVLMFamily(RemoteCodeFamily):
    """CogVLM: one 490-pixel image, a fixed 1280-token budget, the contrib cogvlm converter, bfloat16."""

    name: ClassVar[str] = "cogvlm"
    description: ClassVar[str] = "CogVLM (THUDM/cogvlm-chat-hf), EVA2-CLIP + visual-expert LLaMA (remote code)"
    builder_model_type: ClassVar[str] = "cogvlm"
    default_num_visual_features: ClassVar[int] = 1280
    llm_kind: ClassVar[str] = "cogvlm"
    old_builder_knows: ClassVar[bool] = True
    remote_code_reason: ClassVar[str] = (
        "CogVLM checkpoints are CogVLMForCausalLM with their own model code (trust_remote_code; the README patches "
        "its visual.py), and transformers has no CogVLM class")
    token_formula: ClassVar[str] = (
        "cogvlm: the 1.2 README's max_num_visual_features, 1280 per image (a 490x490 image's (490/14)^2 = 1225 "
        "patches fit in it)")

    def check_spec(self, spec: BuildSpec) -> None:
        super().check_spec(spec)
        if spec.dtype is not Dtype.BFLOAT16:
            raise SpecError(f"cogvlm builds in bfloat16 only (the 1.2 README: 'CogVLM only support bfloat16 "
                            f"precision'); got {spec.dtype.value}: set dtype: bfloat16", path="dtype")

    def tokenizer_dir(self, ctx: PlanContext) -> str:
        return posixpath.join(ctx.layout.workspace, "hf_models", TOKENIZER_SOURCE.rsplit("/", 1)[-1])

    def fetch_steps(self, ctx: PlanContext) -> list[Step]:
        """The checkpoint, the tokenizer run.py reads, and the README's edit of visual.py."""
        tokenizer = self.tokenizer_dir(ctx)
        fetch_tokenizer = ctx.step("fetch-tokenizer", self.fetch_argv(ctx, TOKENIZER_SOURCE, tokenizer),
                                   tool=self.fetch_tool(ctx), outputs=[tokenizer])
        target = posixpath.join(ctx.layout.hf_dir, "visual.py")
        patch = ctx.step("patch-visual", ["sed", "-i", "--", VISUAL_PATCH, target], tool="sed", edits=[target])
        return super().fetch_steps(ctx) + [fetch_tokenizer, patch]

    def convert_extra_args(self, ctx: PlanContext) -> list[str]:
        return ["--use_prompt_tuning"]

    def llm_flags(self, ctx: PlanContext) -> list[str]:
        dtype = ctx.spec.dtype.value
        return ["--gemm_plugin", dtype, "--gpt_attention_plugin", dtype, "--remove_input_padding", "enable"]

    def llm_extra_flags(self, ctx: PlanContext) -> list[str]:
        return ["--paged_kv_cache", "enable", "--bert_attention_plugin", "disable", "--moe_plugin", "disable"]

    def validate_step(self, ctx: PlanContext, engine_args: list[str], inputs: list[str]) -> Step:
        """run.py reads the tokenizer's folder as --hf_model_dir (the README's), not the checkpoint's."""
        step = super().validate_step(ctx, engine_args, inputs)
        argv = list(step.argv)
        argv[argv.index("--hf_model_dir") + 1] = self.tokenizer_dir(ctx)
        return step.model_copy(update={"argv": argv, "inputs": [*step.inputs, self.tokenizer_dir(ctx)]})

    def validate_args(self, ctx: PlanContext) -> list[str]:
        return list(RUN_FLAGS)
