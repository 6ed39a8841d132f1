"""VILA (Efficient-Large-Model/vila-*): LLaVA-like, but its checkpoint needs the VILA code base."""

from __future__ import annotations

import posixpath
from typing import Any, ClassVar, NoReturn

from vlmforge.errors import ToolchainUnavailable
from vlmforge.families import register_family
from vlmforge.families.base import DecoderOnlyFamily
from vlmforge.plans.model import PlanContext, Step
from vlmforge.specs.schema import Dialect

# The seed's source patches (0.9 dialect): load the vision tower eagerly, and make AWQ work without
# replacing Hugging Face's LLaMA implementation.
SEED_PATCHES: tuple[tuple[str, str, str], ...] = (
    ("patch-delay-load", "s/delay_load=True/delay_load=False/g", "llava/model/llava_arch.py"),
    (
        "patch-attention-mask",
        "/vision_tower = self.get_vision_tower()/a \\\n    attention_mask = torch.ones_like(input_ids, dtype=torch.bool)",
        "llava/model/llava_arch.py",
    ),
    (
        "patch-seqlens",
        "s/seqlens_in_batch=sorted_seqlens_in_batch/#seqlens_in_batch=sorted_seqlens_in_batch/g",
        "llava/model/language_model/llava_llama.py",
    ),
)

HF_UNAVAILABLE = (
    "the hf toolchain cannot build VILA: its checkpoints need the VILA code base, which is not a "
    "transformers model; `vlmforge plan` renders the TensorRT-LLM commands for it"
)


def _hf_unavailable(*args: Any, **kwargs: Any) -> NoReturn:
    """Every hf-toolchain hook of VILA: refuse with the reason and the way out."""
    raise ToolchainUnavailable(HF_UNAVAILABLE)


@register_family
class VilaFamily(DecoderOnlyFamily):
    """VILA: the visual builder imports VILA's own code (--vila_path)."""

    name: ClassVar[str] = "vila"
    description: ClassVar[str] = "VILA (Efficient-Large-Model/vila-*), needs the VILA code base"
    default_num_visual_features: ClassVar[int] = 576
    llm_kind: ClassVar[str] = "llama"
    fused_mlp_default: ClassVar[bool] = True
    supports_fused_mlp: ClassVar[bool] = True
    needs_code_source: ClassVar[bool] = True
    default_code_source: ClassVar[str] = "https://github.com/Efficient-Large-Model/VILA.git"
    code_dir_name: ClassVar[str] = "VILA"
    golden_prompt: ClassVar[str | None] = "Please describe the traffic condition."
    hf_supported: ClassVar[bool] = False
    hf_unsupported_reason: ClassVar[str] = HF_UNAVAILABLE

    # The hf toolchain: none of its hooks can work without VILA's own model code.
    make_tiny = hf_model_class = load_model = load_processor = architecture_facts = pixel_values = _hf_unavailable
    visual_module = extract_llm = llm_class = llm_prefix = prompt_length = generate = reference_generate = _hf_unavailable

    def code_path(self, ctx: PlanContext) -> str:
        source = ctx.spec.code_source or ""
        return ctx.layout.code_dir if "://" in source or source.endswith(".git") else source

    def fetch_steps(self, ctx: PlanContext) -> list[Step]:
        source = ctx.spec.code_source or ""
        code = self.code_path(ctx)
        steps: list[Step] = []
        if code == ctx.layout.code_dir:
            steps.append(ctx.step("fetch-code", ["git", "clone", "--", source, code], tool="git", outputs=[code]))
        if ctx.dialect.dialect is Dialect.V0_9:
            steps += super().fetch_steps(ctx)
            for name, script, relpath in SEED_PATCHES:
                target = posixpath.join(code, relpath)
                steps.append(ctx.step(name, ["sed", "-i", "--", script, target], tool="sed", edits=[target]))
        else:
            requirements = posixpath.join(ctx.dialect.cwd, "requirements-vila.txt")
            steps.append(ctx.step("install-code-deps", ["python", "-m", "pip", "install", "-r", "requirements-vila.txt"],
                                  tool="pip", inputs=[requirements]))
            steps += super().fetch_steps(ctx)
        return steps

    def visual_model_type(self, ctx: PlanContext) -> str:
        return "vila"

    def visual_extra_args(self, ctx: PlanContext) -> list[str]:
        return ["--vila_path", self.code_path(ctx)]
