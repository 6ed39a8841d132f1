"""Weight-only quantized LLMs (optimum-quanto): quantize and save, and load for serving."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch

logger = logging.getLogger(__name__)

QuantWeights = Literal["int8", "int4"]

QUANTO_WEIGHTS_FILE = "model.safetensors"
QUANTO_MAP_FILE = "quanto_qmap.json"
QUANTO_ALIASES_FILE = "quanto_aliases.json"


def quantize_and_save(
    llm: torch.nn.Module, out_dir: Path, weights: QuantWeights, exclude: Sequence[str] | None = None
) -> Path:
    """Weight-only quantize a decoder-only LLM with optimum-quanto IN PLACE, freeze it, and save it.

    Pass a model you own (not one sharing modules with a full model you still use). ``out_dir``
    gets config.json, model.safetensors (quanto's state dict: ``*.weight._data``, ``*._scale``...),
    quanto_qmap.json (the quantization map) and quanto_aliases.json (tied keys). ``exclude``:
    module name patterns left in float (default: the lm_head).
    """
    from optimum.quanto import freeze, qint4, qint8, quantization_map, quantize
    from safetensors.torch import save_file

    qtypes = {"int8": qint8, "int4": qint4}
    if weights not in qtypes:
        raise ValueError(f"unknown quanto weights {weights!r}: use one of {', '.join(qtypes)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    quantize(llm, weights=qtypes[weights], exclude=list(exclude) if exclude is not None else ["lm_head"])
    freeze(llm)
    llm.config.save_pretrained(out_dir)
    state, aliases = _split_aliases(llm.state_dict())
    save_file(state, str(out_dir / QUANTO_WEIGHTS_FILE), metadata={"format": "pt"})
    (out_dir / QUANTO_MAP_FILE).write_text(json.dumps(quantization_map(llm), indent=1, sort_keys=True))
    (out_dir / QUANTO_ALIASES_FILE).write_text(json.dumps(aliases, indent=1, sort_keys=True))
    logger.info("saved quanto %s LLM to %s", weights, out_dir)
    return out_dir


def _split_aliases(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors refuses shared storage: keep the first key of each tied group (embed_tokens) and
    record the others (lm_head.weight) as aliases restored at load time. Tensors come back on the CPU."""
    first: dict[tuple[int, torch.dtype, tuple[int, ...]], str] = {}
    out: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for key, value in state.items():
        ident = (value.data_ptr(), value.dtype, tuple(value.shape))
        if value.numel() and ident in first:
            aliases[key] = first[ident]
        else:
            first[ident] = key
            out[key] = value.detach().to("cpu").contiguous()
    return out, aliases


def load_quantized(
    model_cls: type, out_dir: Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> torch.nn.Module:
    """A fresh ``model_cls`` object from a :func:`quantize_and_save` directory (eval mode, on ``device``).

    ``dtype`` is that of the non-quantized parameters: use the dtype the LLM was quantized in.
    """
    from optimum.quanto import requantize
    from safetensors.torch import load_file
    from transformers import AutoConfig

    out_dir = Path(out_dir)
    config = AutoConfig.from_pretrained(out_dir)
    # Not on torch.device("meta"): requantize() only fills the state dict, so non-persistent buffers
    # (LLaMA's rotary inv_freq) would stay uninitialised and the logits wrong.
    model = model_cls._from_config(config, dtype=dtype)
    state = load_file(str(out_dir / QUANTO_WEIGHTS_FILE))
    for alias, source in json.loads((out_dir / QUANTO_ALIASES_FILE).read_text()).items():
        state[alias] = state[source]
    qmap = json.loads((out_dir / QUANTO_MAP_FILE).read_text())
    requantize(model, state, qmap, device=torch.device(device))
    model.tie_weights()
    return model.eval()
