"""Write a TensorRT-LLM checkpoint (config.json + rank{N}.safetensors) from a transformers LLM.

LLaMA-type LLMs (LLaMA, Mistral, Qwen2: every transformers class ModelOpt's exporter knows) go through
``modelopt.torch.export.export_tensorrt_llm_checkpoint``, then get the config fixes TensorRT-LLM 1.2's
``quantize_by_modelopt`` applies (architecture, the weight-only quant_algo, no FP8 KV cache unless asked) and two
it misses under transformers 5 (``rotary_base`` from ``rope_parameters``; the stray ``quant_cfg.json``). OPT has no
ModelOpt exporter: :mod:`vlmforge.modeling.trtllm.opt` converts it the way TensorRT-LLM's own converter does.
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import torch

from vlmforge.modeling.trtllm.config import KV_CACHE_QUANT_ALGO, QUANT_ALGO
from vlmforge.specs.schema import KvCacheDtype, QuantMethod

log = logging.getLogger(__name__)

MODELOPT_DECODERS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen"}
"""transformers model_type -> ModelOpt's decoder type (its exporter's MODEL_NAME_TO_TYPE)."""
OWN_CONVERTERS = ("opt",)
"""model_types vlmforge converts itself (ModelOpt has no exporter for them)."""
CHECKPOINT_DTYPES = ("float16", "bfloat16")
"""What ModelOpt's exporter writes (anything else falls back to float16)."""


def writer_for(model_type: str) -> str:
    """``modelopt`` or ``opt``: who writes this LLM's checkpoint; ValueError naming the supported types."""
    if model_type in MODELOPT_DECODERS:
        return "modelopt"
    if model_type in OWN_CONVERTERS:
        return model_type
    raise ValueError(f"no TensorRT-LLM checkpoint writer for {model_type!r} LLMs: vlmforge writes "
                     f"{', '.join(sorted(MODELOPT_DECODERS) + list(OWN_CONVERTERS))}")


def rope_theta(config: Any) -> float | None:
    """The RoPE base, from transformers 5's ``rope_parameters`` or 4's ``rope_theta``."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    theta = getattr(config, "rope_theta", None)
    return float(theta) if theta is not None else None


def rotary_scaling(config: Any) -> dict[str, Any] | None:
    """TensorRT-LLM's ``rotary_scaling`` (None for plain RoPE: transformers 5 calls that rope_type "default")."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if not isinstance(params, dict):
        return None
    kind = params.get("rope_type", params.get("type"))
    if kind in (None, "default"):
        return None
    return {"type": kind, **{k: v for k, v in params.items() if k not in ("rope_type", "type", "rope_theta")}}


def export_modelopt(llm: torch.nn.Module, out_dir: Path, *, dtype: str, tp: int, pp: int, method: QuantMethod,
                    kv_cache: KvCacheDtype) -> dict[str, Any]:
    """ModelOpt's export of ``llm`` (fake-quant or float) into ``out_dir``; returns the fixed config.json.

    The export changes ``llm`` in place (fused q/k/v and gate/up share one pre-quant scale and amax afterwards,
    and the vocabulary may be padded): compare the checkpoint with the model as it is after this call."""
    from modelopt.torch.export import export_tensorrt_llm_checkpoint

    config = llm.config  # type: ignore[attr-defined]
    decoder = MODELOPT_DECODERS[config.model_type]
    out_dir = Path(out_dir)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*tensorrt_llm.*")
        warnings.filterwarnings("ignore", message=".*lm_head quantization.*")
        with torch.inference_mode(), redirect_stdout(sys.stderr):  # it prints its ranks on stdout
            export_tensorrt_llm_checkpoint(llm, decoder, getattr(torch, dtype), export_dir=out_dir,
                                           inference_tensor_parallel=tp, inference_pipeline_parallel=pp)
    path = out_dir / "config.json"
    written = json.loads(path.read_text())
    written["architecture"] = type(llm).__name__
    quant = written.setdefault("quantization", {})
    if method.weight_only or method is QuantMethod.NONE:
        quant["quant_algo"] = QUANT_ALGO[method]  # fp16 weights; trtllm-build quantizes them (W8A16/W4A16)
    expected_kv = KV_CACHE_QUANT_ALGO[kv_cache]
    if kv_cache is KvCacheDtype.AUTO:
        quant["kv_cache_quant_algo"] = None  # quantize_by_modelopt: no KV-cache quantization unless asked
    elif quant.get("kv_cache_quant_algo") != expected_kv:
        raise ValueError(f"the exporter wrote kv_cache_quant_algo {quant.get('kv_cache_quant_algo')!r} for a "
                         f"{kv_cache.value} KV cache (expected {expected_kv}): its k/v quantizers were not calibrated")
    theta = rope_theta(config)
    if theta is not None:
        written["rotary_base"] = theta  # ModelOpt 0.47 reads config.rope_theta, gone in transformers 5
    written["rotary_scaling"] = rotary_scaling(config)
    if decoder == "qwen":  # what quantize_by_modelopt adds for Qwen
        written.update(qwen_type=config.model_type, norm_epsilon=config.rms_norm_eps,
                       intermediate_size=config.intermediate_size)
    written.setdefault("hidden_act", config.hidden_act)
    written.setdefault("logits_dtype", "float16")
    written.setdefault("position_embedding_type", "rope_gpt_neox")
    path.write_text(json.dumps(written, indent=4))
    stray = out_dir / "quant_cfg.json"  # read by TensorRT-LLM only for MIXED_PRECISION
    if stray.exists() and quant.get("quant_algo") != "MIXED_PRECISION":
        stray.unlink()
    return written
