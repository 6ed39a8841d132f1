"""BLIP-2 with an OPT language model (Salesforce/blip2-opt-*): 32 Q-Former query tokens per image."""

from __future__ import annotations

from typing import ClassVar

from vlmforge.errors import PlanError
from vlmforge.families import register_family
from vlmforge.families.base import DecoderOnlyFamily, ModelFamily
from vlmforge.plan import PlanContext, Step
from vlmforge.spec import Dialect, parse_source


class Blip2Common(ModelFamily):
    """What both BLIP-2 families share: the Q-Former's query tokens and the seed's naming."""

    default_num_visual_features: ClassVar[int] = 32
    legacy_llm_repos: ClassVar[dict[str, str]] = {}
    """0.9 dialect: BLIP-2 variant -> the LLM-only repository the seed clones (its visual builder knows only these)."""

    def legacy_variant(self, ctx: PlanContext) -> str:
        """The seed's MODEL_NAME (opt-2.7b, flan-t5-xl): its visual --model_type and its LLM repository."""
        source = parse_source(ctx.spec.source)
        variant = source.location.rsplit("/", 1)[-1].removeprefix("blip2-") if source.scheme == "hf" else ""
        if variant not in self.legacy_llm_repos:
            raise PlanError(
                f"dialect 0.9: build_visual_engine.py knows {self.name} only as "
                f"{', '.join(sorted(self.legacy_llm_repos))} (from hf://Salesforce/blip2-<variant>); "
                f"{ctx.spec.source} is none of them: use dialect 1.2 (--dialect 1.2)"
            )
        return variant

    def visual_model_type(self, ctx: PlanContext) -> str:
        return self.legacy_variant(ctx) if ctx.dialect.dialect is Dialect.V0_9 else "blip2"

    def fetch_steps(self, ctx: PlanContext) -> list[Step]:
        if ctx.dialect.dialect is not Dialect.V0_9:
            return super().fetch_steps(ctx)
        repo = self.legacy_llm_repos[self.legacy_variant(ctx)]
        hf_dir = ctx.layout.hf_dir
        return [ctx.step("fetch", ["git", "clone", f"https://huggingface.co/{repo}", hf_dir], tool="git", outputs=[hf_dir])]


@register_family
class Blip2OptFamily(Blip2Common, DecoderOnlyFamily):
    """BLIP-2 OPT: ViT-g + Q-Former, OPT decoder; visual features prepended as a prompt table."""

    name: ClassVar[str] = "blip2-opt"
    description: ClassVar[str] = "BLIP-2 with OPT (Salesforce/blip2-opt-*)"
    llm_kind: ClassVar[str] = "opt"
    emit_beam_width: ClassVar[bool] = True
    tiny_source: ClassVar[str | None] = "tiny://blip2-opt"
    legacy_llm_repos: ClassVar[dict[str, str]] = {"opt-2.7b": "facebook/opt-2.7b", "opt-6.7b": "facebook/opt-6.7b"}

    def convert_extra_args(self, ctx: PlanContext) -> list[str]:
        # 1.2 converts the whole BLIP-2 checkpoint and needs to be told to take its OPT part.
        return [] if ctx.dialect.dialect is Dialect.V0_9 else ["--model_type", "blip2"]



