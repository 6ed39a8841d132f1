"""The LLM side of quantization: the LLM taken out of the VLM, the shape rules checked before calibration, and
logit comparisons on the golden prefixes (what the quantize and checkpoint stages record)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from vlmforge.errors import SpecError
from vlmforge.specs.schema import QuantMethod

if TYPE_CHECKING:  # torch is imported where it is used: the build CLI's checks import this module
    import torch

INT4_GROUPS = (32, 64, 128, 256)


class LogitComparison(BaseModel):
    """Logits of one model against another's on the same left-padded prefixes (padding ignored)."""

    max_error: float
    """Largest absolute difference over every prompt position."""
    next_token_error: float
    """Largest absolute difference at each prompt's last position: the first generated token's logits, which
    validation's max_logit_error also covers."""
    next_token_agreement: float
    """Fraction of prompts whose next-token argmax is the same."""
    scale: float
    """The second model's largest absolute logit (the reference's scale)."""


def standalone_llm(family: Any, model: Any) -> Any:
    """The family's LLM (sharing the VLM's modules: quantizing it changes the VLM), ready for ModelOpt: eval mode,
    ``config.architectures`` set (ModelOpt 0.47's exporters iterate over it; a model built from a config has None)."""
    llm = family.extract_llm(model).eval()
    llm.config.architectures = [type(llm).__name__]
    return llm


def quantized_linears(llm: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The linears a quantization touches: every one of the decoder layers (the head, embeddings and anything
    outside the layers stay in float, as in TensorRT-LLM's exports)."""
    import torch

    return {name: module for name, module in llm.named_modules()
            if isinstance(module, torch.nn.Linear) and ".layers." in name}


def check_groups(llm: torch.nn.Module, method: QuantMethod, group_size: int, tp: int = 1) -> None:
    """int4 groups must tile every quantized layer's input on each TP rank; refuses with the group sizes that fit."""
    if not method.grouped:
        return
    widths = sorted({module.in_features for module in quantized_linears(llm).values()})
    bad = [w for w in widths if (w // tp) % group_size or w % tp]
    if bad:
        fits = [g for g in INT4_GROUPS if all(w % tp == 0 and (w // tp) % g == 0 for w in widths)]
        per_rank = "" if tp == 1 else f" / tp {tp}"
        raise SpecError(
            f"group_size {group_size} does not divide the LLM's layer input widths {bad}{per_rank}; "
            + (f"use group_size {', '.join(map(str, fits))}" if fits else "no int4 group size fits: use int8_sq or fp8"),
            path="quantization.group_size",
        )


def batch_logits(llm: torch.nn.Module, batches: Sequence[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    """float32 CPU logits of every batch."""
    import torch

    out = []
    with torch.no_grad():
        for batch in batches:
            out.append(llm(**batch).logits.float().cpu())
    return out


def compare_logits(got: Sequence[torch.Tensor], ref: Sequence[torch.Tensor],
                   batches: Sequence[dict[str, torch.Tensor]]) -> LogitComparison:
    """``got`` against ``ref`` over the valid (unpadded) positions of ``batches``; the last column is each left-padded
    prompt's last position."""
    max_error = last_error = scale = 0.0
    agree = total = 0
    for g, r, batch in zip(got, ref, batches, strict=True):
        valid = batch["attention_mask"].bool().cpu()
        vocab = min(g.shape[-1], r.shape[-1])
        g, r = g[..., :vocab], r[..., :vocab]
        diff = (g - r).abs()
        max_error = max(max_error, diff[valid].max().item())
        last_error = max(last_error, diff[:, -1].max().item())
        scale = max(scale, r[valid].abs().max().item())
        agree += int((g[:, -1].argmax(-1) == r[:, -1].argmax(-1)).sum())
        total += g.shape[0]
    return LogitComparison(max_error=round(max_error, 6), next_token_error=round(last_error, 6),
                           next_token_agreement=round(agree / max(total, 1), 4), scale=round(scale, 4))
