"""Where a module lives and in what precision, and seeding (torch-level helpers shared by every layer)."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def seed_all(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and CUDA) generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def model_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter (CPU for a module without parameters)."""
    try:
        return next(module.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def model_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype of a module's first floating-point parameter (float32 if it has none)."""
    for param in module.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32



def weight_bytes(module: torch.nn.Module, dtype: torch.dtype) -> int:
    """Bytes of ``module``'s parameters in ``dtype``, tied ones counted once (what its safetensors hold, headers aside)."""
    seen: set[int] = set()
    total = 0
    itemsize = torch.empty((), dtype=dtype).element_size()
    for param in module.parameters():
        if param.data_ptr() not in seen:
            seen.add(param.data_ptr())
            total += param.numel() * itemsize
    return total



def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a spec/engine dtype name (float16, bfloat16, float32)."""
    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[name]


def model_from_config(model_cls: Any, config: Any, dtype: Any) -> Any:
    """An untrained ``model_cls`` of ``config`` in ``dtype`` (weights loaded next): a concrete transformers class, or
    an Auto class whose config names the architecture (LLaVA-NeXT's LLM is Llama or Mistral)."""
    make = model_cls._from_config if hasattr(model_cls, "_from_config") else model_cls.from_config
    return make(config, dtype=dtype)
