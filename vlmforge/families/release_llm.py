"""The shape of the families TensorRT-LLM 1.2 added to its multimodal builder (LLaVA-NeXT, Qwen2-VL, ...).

Their plans are the 1.2 README's: the LLM converted by the release's own ``convert_checkpoint.py`` (or quantize.py),
``trtllm-build`` with the attention plugin and ``--max_num_tokens``, ``build_multimodal_engine.py --model_type``.
v0.10 (dialect 0.9) has none of them: its builder's ``--model_type`` lacks them, so such a plan is refused naming the
release that has it. On the hf toolchain they are plan-only until a family writes its hf path (each says which
transformers class would serve it); LLaVA-NeXT and Qwen2-VL have (they set ``hf_supported``).
"""

from __future__ import annotations

import dataclasses
import posixpath
from typing import ClassVar

from vlmforge.errors import PlanError, SpecError
from vlmforge.families.base import DecoderOnlyFamily
from vlmforge.plans.model import DIALECTS, DialectInfo, PlanContext, Step
from vlmforge.specs.schema import BuildSpec, Dialect, ImageSize, QuantMethod
from vlmforge.specs.visual import FamilyNumber, VisualContract


class ReleaseConverterFamily(DecoderOnlyFamily):
    """A family the 1.2 builder knows and 0.9's does not, converted by the release's scripts, plan-only on hf."""

    release_converter: ClassVar[bool] = True
    hf_supported: ClassVar[bool] = False
    builder_model_type: ClassVar[str]
    """build_multimodal_engine.py --model_type."""
    hf_class: ClassVar[str]
    """The transformers class that would serve the family on the hf toolchain (its next step)."""
    plan_dialects: ClassVar[tuple[Dialect, ...]] = (Dialect.V1_2,)

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "hf_unsupported_reason" not in cls.__dict__ and "hf_class" in cls.__dict__:
            cls.hf_unsupported_reason = (
                f"{cls.name} is plan-only on the hf toolchain for now: transformers' {cls.hf_class} would serve it, "
                "and its hf path (convert, visual ONNX export, validation, serving) is the next step; `vlmforge plan "
                f"MODEL` writes the commands that build it in NVIDIA's TensorRT-LLM "
                f"{DIALECTS[cls.plan_dialects[0]].release} container")

    def visual_model_type(self, ctx: PlanContext) -> str:
        return self.builder_model_type

    def check_spec(self, spec: BuildSpec) -> None:
        if self.size_dependent_tokens and spec.architecture.num_visual_features is not None:
            raise SpecError(
                f"architecture.num_visual_features does not apply to {self.name}: its visual tokens depend on each "
                "image's size and are counted at visual.max_image_size; remove it (set visual.max_image_size instead)",
                path="architecture.num_visual_features")

    def check_dialect(self, spec: BuildSpec, info: DialectInfo) -> None:
        if info.dialect not in self.plan_dialects:
            have = DIALECTS[self.plan_dialects[0]]
            raise PlanError(
                f"{self.name} cannot be planned in dialect {info.dialect.value}: TensorRT-LLM {info.release}'s "
                f"{info.visual_builder} has no --model_type {self.builder_model_type} (the family arrived later); "
                f"TensorRT-LLM {have.release} builds it ({have.visual_builder} --model_type "
                f"{self.builder_model_type}): "
                f"set dialect: '{have.dialect.value}' (or --dialect {have.dialect.value})")
        super().check_dialect(spec, info)

    def attention_plugin(self, ctx: PlanContext) -> list[str]:
        """--gpt_attention_plugin as the README writes it; its FP8 build leaves the plugin at its default."""
        if ctx.spec.quantization.method is QuantMethod.FP8:
            return []
        return ["--gpt_attention_plugin", ctx.spec.dtype.value]

    def max_num_tokens(self, ctx: PlanContext) -> int | None:
        """--max_num_tokens: max_input_len, the README's and NVIDIA CI's value for these families (None: not passed,
        where a family's README section leaves it at trtllm-build's default)."""
        return ctx.derived.max_input_len

    def family_numbers(self, spec: BuildSpec, size: ImageSize | None) -> tuple[FamilyNumber, ...]:
        numbers = (FamilyNumber("max_num_tokens", spec.limits.max_input_len, "max_input_len (TensorRT-LLM 1.2's "
                                "README and CI for these families)", "trtllm-build --max_num_tokens: tokens of one "
                                "forward pass, so one full prompt fits it"),)
        return numbers + self.visual_numbers(spec, size)

    def visual_numbers(self, spec: BuildSpec, size: ImageSize | None) -> tuple[FamilyNumber, ...]:
        """The family's own visual numbers at the largest image ``size``."""
        return ()

    def llm_step(self, ctx: PlanContext) -> tuple[Step, str]:
        derived = ctx.derived
        ckpt = ctx.layout.checkpoint_dir
        out = posixpath.join(ctx.layout.engine_dir, "llm")
        argv = ["trtllm-build", "--checkpoint_dir", ckpt, "--output_dir", out] + self.attention_plugin(ctx)
        argv += self.llm_build_flags(ctx) + [
            "--max_batch_size", str(ctx.spec.limits.max_batch_size),
            "--max_input_len", str(derived.max_input_len),
            *self.sizing_flag_for_output(ctx),
        ]
        num_tokens = self.max_num_tokens(ctx)
        argv += ["--max_num_tokens", str(num_tokens)] if num_tokens is not None else []
        argv += ["--max_multimodal_len", str(derived.max_multimodal_len)]
        return ctx.step("build-llm", argv, tool="trtllm-build", gpus=1, inputs=[ckpt], outputs=[out]), out


class GptVariantFamily(ReleaseConverterFamily):
    """A family whose LLM TensorRT-LLM 1.2 converts with ``../gpt/convert_checkpoint.py --gpt_variant`` (Fuyu's
    Persimmon, Kosmos-2's text model): the README's flags, no --max_num_tokens; the seed's dialect refused (the seed
    README has no section for them, and vlmforge no table of v0.10.0's gpt converter, though v0.10.0's
    build_visual_engine.py lists their --model_type); quantization with calibration refused (the README builds them
    in float16 only and quantize.py was not checked on them), weight-only planned with the converter's flags."""

    llm_kind: ClassVar[str] = "gpt"
    gpt_variant: ClassVar[str]
    """convert_checkpoint.py --gpt_variant (the README's last flag)."""
    readme_section: ClassVar[str]
    """The family's section title in the multimodal README."""

    def check_dialect(self, spec: BuildSpec, info: DialectInfo) -> None:
        if info.dialect is Dialect.V0_9:
            raise PlanError(
                f"{self.name} cannot be planned in dialect 0.9: the seed README (the v0.10-era multimodal README that dialect "
                f"reproduces) has no "
                f"{self.readme_section} section and vlmforge's 0.9 contract holds no table of v0.10.0's "
                f"examples/gpt/convert_checkpoint.py (its build_visual_engine.py does list --model_type "
                f"{self.builder_model_type}); set dialect: '1.2'")
        if spec.quantization.needs_calibration:
            raise PlanError(
                f"quantization.method {spec.quantization.method.value}: the 1.2 README builds {self.name} in float16 "
                "only and vlmforge has not checked quantize.py (ModelOpt) on its LLM; use none, int8_wo or int4_wo "
                "(the gpt converter's --use_weight_only)")
        super().check_dialect(spec, info)

    def convert_step(self, ctx: PlanContext) -> Step:
        step = super().convert_step(ctx)
        step.argv.extend(["--gpt_variant", self.gpt_variant])
        return step

    def max_num_tokens(self, ctx: PlanContext) -> int | None:
        return None  # not in the README's section


class RemoteCodeFamily(ReleaseConverterFamily):
    """A family whose checkpoints need foreign model code (``trust_remote_code``, a .nemo archive) or a transformers
    pin of their own: plan-only everywhere. Its plan is the 1.2 README's, flag for flag (each family's
    :meth:`llm_flags`); its visual tokens per image are a fixed count, the README's, explained by ``--explain``."""

    remote_code_reason: ClassVar[str]
    """Why transformers 5 (the hf toolchain) cannot load it, in words."""
    hf_status: ClassVar[str] = "no (remote code): plan-only"
    """`vlmforge families`' hf column."""
    token_formula: ClassVar[str]
    """How the README counts one image's visual tokens (``--explain``)."""
    default_max_new_tokens: ClassVar[int] = 128
    """run.py's own --max_new_tokens default (the README's commands mostly leave it)."""
    old_builder_knows: ClassVar[bool] = False
    """v0.10.0's build_visual_engine.py already had this --model_type (cogvlm, neva), though the seed README, the 0.9
    dialect's source, has no commands for it."""

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "remote_code_reason" in cls.__dict__:
            cls.hf_unsupported_reason = (
                f"{cls.name} is plan-only: {cls.remote_code_reason}; vlmforge's hf toolchain runs transformers 5 "
                "and loads no remote code, so it cannot build, validate or serve it. Use the trtllm toolchain's plan: "
                f"`vlmforge plan MODEL` writes the exact commands for NVIDIA's TensorRT-LLM "
                f"{DIALECTS[cls.plan_dialects[0]].release} container, to run there (`vlmforge build --toolchain "
                "trtllm` refuses too: it validates engines against an hf reference this family lacks)")

    def check_dialect(self, spec: BuildSpec, info: DialectInfo) -> None:
        if info.dialect not in self.plan_dialects and self.old_builder_knows:
            have = DIALECTS[self.plan_dialects[0]]
            raise PlanError(
                f"{self.name} cannot be planned in dialect {info.dialect.value}: TensorRT-LLM {info.release}'s "
                f"{info.visual_builder} knows --model_type {self.builder_model_type}, but the seed README (the "
                f"{info.dialect.value} dialect's source) has no {self.name} commands, so there is no reproducible "
                f"{info.dialect.value} plan; TensorRT-LLM {have.release} builds it (its README's commands): set "
                f"dialect: '{have.dialect.value}' (or --dialect {have.dialect.value})")
        super().check_dialect(spec, info)

    def check_spec(self, spec: BuildSpec) -> None:
        super().check_spec(spec)
        quant = spec.quantization
        if quant.active:
            raise SpecError(
                f"{self.name} plans are the 1.2 README's float build only; vlmforge plans no quantized {self.name} "
                f"engine yet (got quantization.method {quant.method.value}, kv_cache_dtype "
                f"{quant.kv_cache_dtype.value}): set quantization.method: none and kv_cache_dtype: auto",
                path="quantization.method" if quant.method is not QuantMethod.NONE else "quantization.kv_cache_dtype")
        if spec.parallel.pp > 1:
            raise SpecError(f"{self.name}: the 1.2 multimodal runner's README documents tensor parallelism only; "
                            "set parallel.pp: 1", path="parallel.pp")

    def visual_contract(self, spec: BuildSpec) -> VisualContract:
        """The fixed count, its source the README's formula (``--explain``) unless the spec sets its own."""
        contract = super().visual_contract(spec)
        if spec.architecture.num_visual_features is None:
            contract = dataclasses.replace(contract, tokens_source=self.token_formula)
        return contract

    def family_numbers(self, spec: BuildSpec, size: ImageSize | None) -> tuple[FamilyNumber, ...]:
        return self.visual_numbers(spec, size)

    def llm_flags(self, ctx: PlanContext) -> list[str]:
        """The README's plugin flags of trtllm-build, before the sizes."""
        return ["--gpt_attention_plugin", ctx.spec.dtype.value, "--gemm_plugin", ctx.spec.dtype.value]

    def llm_extra_flags(self, ctx: PlanContext) -> list[str]:
        """The README's flags of trtllm-build after the sizes (none by default)."""
        return []

    def llm_step(self, ctx: PlanContext) -> tuple[Step, str]:
        derived = ctx.derived
        ckpt = ctx.layout.checkpoint_dir
        out = posixpath.join(ctx.layout.engine_dir, "llm")
        argv = ["trtllm-build", "--checkpoint_dir", ckpt, "--output_dir", out] + self.llm_flags(ctx)
        if ctx.spec.limits.max_beam_width != 1:
            argv += ["--max_beam_width", str(ctx.spec.limits.max_beam_width)]
        argv += ["--max_batch_size", str(ctx.spec.limits.max_batch_size),
                 "--max_input_len", str(derived.max_input_len), *self.sizing_flag_for_output(ctx),
                 "--max_multimodal_len", str(derived.max_multimodal_len)] + self.llm_extra_flags(ctx)
        return ctx.step("build-llm", argv, tool="trtllm-build", gpus=1, inputs=[ckpt], outputs=[out]), out

    def validate_args(self, ctx: PlanContext) -> list[str]:
        """run.py's README flags beside --hf_model_dir / --engine_dir (none by default)."""
        return []

    def trtllm_steps(self, ctx: PlanContext) -> list[Step]:
        steps = self.fetch_steps(ctx)
        steps.append(self.convert_step(ctx))
        llm, llm_dir = self.llm_step(ctx)
        visual, visual_dir = self.visual_step(ctx)
        steps += [llm, visual]
        validate = self.validate_step(ctx, ["--engine_dir", ctx.layout.engine_dir] + self.validate_args(ctx),
                                      [llm_dir, visual_dir])
        steps.append(validate)
        return steps
