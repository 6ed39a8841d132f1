"""Saving checkpoints in a dtype without touching the live module, and measuring what was saved."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def save_pretrained_as(model: Any, out_dir: Path, dtype: torch.dtype) -> Path:
    """``save_pretrained`` a transformers model in ``dtype`` without touching the live module.

    Casting the module itself (a ``.to(bf16)`` / ``.to(fp32)`` round trip) would silently round the
    weights it shares with the full model. Tied tensors (lm_head <-> embed_tokens) stay tied.
    """
    cast: dict[tuple[int, torch.dtype, tuple[int, ...]], torch.Tensor] = {}
    state: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if value.is_floating_point():
            value = cast.setdefault((value.data_ptr(), value.dtype, tuple(value.shape)), value.to(dtype))
        state[key] = value
    old = model.config.dtype
    try:
        model.save_pretrained(out_dir, state_dict=state)
        # save_pretrained writes the live module's dtype into config.json: write the saved one instead
        model.config.dtype = dtype
        model.config.save_pretrained(out_dir)
    finally:
        model.config.dtype = old
    return Path(out_dir)



def safetensors_size(path: Path) -> int:
    """Total size in bytes of the ``*.safetensors`` files under ``path``."""
    return sum(p.stat().st_size for p in Path(path).rglob("*.safetensors"))
