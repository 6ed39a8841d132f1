"""NeVA (NVIDIA NeMo): a NeMo ``.nemo`` archive, vision encoder + projector + NVGPT LLM, no Hugging Face checkpoint.

Plan-only: the checkpoint is a NeMo ``.nemo`` tar (``model_config.yaml`` + ``model_weights.ckpt``), which neither
transformers nor vlmforge's sources read (they take a folder with config.json). The plan is the 1.2 README's: no
download (the README reads ``./neva.nemo``: the spec's ``source`` is that file's path inside the container,
``file:///...nemo``), ``../gpt/convert_checkpoint.py --nemo_ckpt_path`` with the README's ten ``--nemo_rename_key``
pairs, ``trtllm-build``, ``build_multimodal_engine.py --model_type neva --model_path <the .nemo>`` and run.py with the
converted checkpoint folder as ``--hf_model_dir`` (the converter copies the tokenizer there). Tokens: the README's 729
per image (``1 (max_batch_size) * 729 (num_visual_features)``; another vision encoder in the .nemo's
``mm_cfg.vision_encoder`` gives another count: set architecture.num_visual_features). Video NeVA is not planned.
"""

from __future__ import annotations

from typing import ClassVar

from vlmforge.errors import SpecError
from vlmforge.families import register_family
from vlmforge.families.release_llm import RemoteCodeFamily
from vlmforge.plans.model import PlanContext, Step
from vlmforge.specs.schema import BuildSpec, parse_source

RENAME_KEYS = (
    "model:model.language_model",
    "attention.linear_qkv.layer_norm_bias:input_layernorm.bias",
    "attention.linear_qkv.layer_norm_weight:input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias:post_attention_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight:post_attention_layernorm.weight",
    "linear_qkv:query_key_value",
    "linear_fc1:dense_h_to_4h",
    "linear_fc2:dense_4h_to_h",
    "linear_proj:dense",
    "decoder:encoder",
)
"""The README's --nemo_rename_key pairs: NeMo (Megatron-core) layer names to the NVGPT names the gpt converter reads."""


def nemo_path(spec: BuildSpec) -> str:
    """The .nemo file inside the container (the spec's file:// source)."""
    return parse_source(spec.source).location


@register_family
class NevaFamily(RemoteCodeFamily):
    """NeVA: a .nemo archive converted by the gpt converter; 729 visual tokens per image (the README's)."""

    name: ClassVar[str] = "neva"
    description: ClassVar[str] = "NeVA (NVIDIA NeMo .nemo), vision encoder + NVGPT (no Hugging Face checkpoint)"
    builder_model_type: ClassVar[str] = "neva"
    default_num_visual_features: ClassVar[int] = 729
    llm_kind: ClassVar[str] = "gpt"
    old_builder_knows: ClassVar[bool] = True
    golden_prompt: ClassVar[str | None] = "Question: which city is this? Answer:"
    hf_status: ClassVar[str] = "no (.nemo checkpoint): plan-only"
    remote_code_reason: ClassVar[str] = (
        "NeVA checkpoints are NeMo .nemo archives (model_config.yaml + model_weights.ckpt), not Hugging Face "
        "checkpoints: there is no transformers class and no config.json to load (remote code in the wide sense: NeMo's)")
    token_formula: ClassVar[str] = (
        "neva: the 1.2 README's 729 per image (its .nemo's vision encoder; set architecture.num_visual_features for "
        "another)")

    def check_spec(self, spec: BuildSpec) -> None:
        super().check_spec(spec)
        parsed = parse_source(spec.source)
        if parsed.scheme != "file" or not parsed.location.endswith(".nemo"):
            raise SpecError(
                f"neva reads a NeMo .nemo archive, which vlmforge cannot download or verify: set source to the "
                f"file's path inside the TensorRT-LLM container, file:///workspace/neva.nemo (mount it there); got "
                f"{spec.source}", path="source")

    def fetch_steps(self, ctx: PlanContext) -> list[Step]:
        """None: the README reads the .nemo where it lies (vlmforge's fetch takes Hugging Face folders only)."""
        return []

    def convert_step(self, ctx: PlanContext) -> Step:
        info, spec = ctx.dialect, ctx.spec
        script = f"{info.script_dirs['gpt']}/convert_checkpoint.py"
        ckpt, nemo = ctx.layout.checkpoint_dir, nemo_path(spec)
        argv = ctx.python(script) + ["--nemo_ckpt_path", nemo, "--dtype", spec.dtype.value, "--output_dir", ckpt]
        if spec.parallel.tp > 1:
            argv += ["--tp_size", str(spec.parallel.tp)]
        argv += ["--nemo_rename_key", *RENAME_KEYS]
        return ctx.step("convert", argv, tool=script, inputs=[nemo], outputs=[ckpt])

    def visual_step(self, ctx: PlanContext) -> tuple[Step, str]:
        """The builder reads the .nemo itself (--model_path)."""
        step, out = super().visual_step(ctx)
        argv = list(step.argv)
        argv[argv.index("--model_path") + 1] = nemo_path(ctx.spec)
        return step.model_copy(update={"argv": argv, "inputs": [nemo_path(ctx.spec)]}), out

    def validate_step(self, ctx: PlanContext, engine_args: list[str], inputs: list[str]) -> Step:
        """run.py's --hf_model_dir is the converted checkpoint (the converter copies the tokenizer there)."""
        step = super().validate_step(ctx, engine_args, inputs)
        argv = list(step.argv)
        argv[argv.index("--hf_model_dir") + 1] = ctx.layout.checkpoint_dir
        reads = [path for path in step.inputs if path != ctx.layout.hf_dir] + [ctx.layout.checkpoint_dir]
        return step.model_copy(update={"argv": argv, "inputs": reads})
