"""The unified Hugging Face checkpoint (ModelOpt's ``export_hf_checkpoint``): what newer TensorRT-LLM's PyTorch
backend, vLLM and SGLang load. Written and read back like the TensorRT-LLM checkpoint.

ModelOpt 0.47's exporter needs ``config.architectures`` (a model built from a config has None, and
``is_multimodal_model`` iterates over it: the TypeError of issue 13). It exports in the calibration dtype (float32),
the read-back is compared with the quantized model there (float32 throughout: exact), and only then are the float
tensors cast to the spec's dtype (:func:`cast_unified`, each checked against its source; the scales stay float32). Layout (HF names): int4 AWQ/W4A8
``weight`` uint8 [O/2, I] packed as in the TensorRT-LLM checkpoint, ``weight_scale`` [O, I/G] (W4A8: and
``weight_scale_2``); int8 SmoothQuant ``weight`` int8, ``weight_scale`` [O]; FP8 ``weight`` float8_e4m3fn and scalar
``weight_scale``; ``input_scale`` where activations are quantized; ``pre_quant_scale`` only where it could not be
folded into the norm before (o_proj, down_proj); KV caches: FP8 only (``k_scale``/``v_scale``).
"""

from __future__ import annotations

import json
import sys
import warnings
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import torch

from vlmforge.modeling.trtllm.readback import Readback, fp8_round, simulate_activations, unpack_int4
from vlmforge.specs.schema import KvCacheDtype, QuantMethod

UNIFIED_METHODS = (QuantMethod.INT4_AWQ, QuantMethod.W4A8_AWQ, QuantMethod.INT8_SQ, QuantMethod.FP8)
"""What a unified checkpoint holds here: ModelOpt's calibrated formats (the weight-only ones are TensorRT-LLM
build-time formats, not checkpoint formats)."""
UNIFIED_KV = (KvCacheDtype.AUTO, KvCacheDtype.FP8)
"""ModelOpt 0.47's unified exporter refuses int8 KV caches ("Invalid KV cache quantization format")."""
SCALES = ("weight_scale", "weight_scale_2", "input_scale", "pre_quant_scale", "k_scale", "v_scale")


def prepare_unified(llm: torch.nn.Module) -> None:
    """What the unified exporter does to the fake-quant model first (fused q/k/v and gate/up re-smoothed to share one
    pre-quant scale and amax), done ahead so the model can be run as the checkpoint will hold it: the export itself
    then packs the weights in place and leaves a model that no longer runs."""
    from modelopt.torch.export.unified_export_hf import requantize_resmooth_fused_llm_layers

    llm.config.architectures = [type(llm).__name__]  # type: ignore[attr-defined]
    with torch.inference_mode(), redirect_stdout(sys.stderr):
        requantize_resmooth_fused_llm_layers(llm)


def export_unified(llm: torch.nn.Module, out_dir: Path) -> dict[str, Any]:
    """``export_hf_checkpoint`` of the fake-quant ``llm`` (after :func:`prepare_unified`) into ``out_dir``, in the
    calibration dtype; returns hf_quant_config.json. ``llm`` is spent: its weights are packed in place."""
    from modelopt.torch.export import export_hf_checkpoint

    out_dir = Path(out_dir)
    llm.config.architectures = [type(llm).__name__]  # type: ignore[attr-defined]
    with warnings.catch_warnings(), torch.inference_mode(), redirect_stdout(sys.stderr):
        warnings.filterwarnings("ignore", category=UserWarning)
        # in the model's own dtype: given float16, the exporter rounds the weights to it before it quantizes them,
        # and some int4 codes then differ from the calibrated model's
        export_hf_checkpoint(llm, export_dir=out_dir)
    return json.loads((out_dir / "hf_quant_config.json").read_text())


def cast_unified(out_dir: Path, dtype: str) -> int:
    """Store the float tensors (embeddings, norms with their folded pre-quant scales, head, biases) in ``dtype``;
    quantized weights and every scale stay as they are. Checks each cast tensor against its float32 source (within
    the dtype's rounding) and returns how many were cast."""
    from safetensors.torch import load_file, save_file

    out_dir = Path(out_dir)
    target = getattr(torch, dtype)
    info = torch.finfo(target)
    step, floor = info.eps, info.tiny * info.eps  # relative rounding; absolute below the smallest normal
    count = 0
    for shard in sorted(out_dir.glob("*.safetensors")):
        tensors = load_file(str(shard))
        cast = {k: v.to(target) if v.dtype == torch.float32 and not k.endswith(SCALES) else v for k, v in tensors.items()}
        for key, value in cast.items():
            if value.dtype == target and tensors[key].dtype == torch.float32:
                source = tensors[key]
                if not ((value.float() - source).abs() <= step * source.abs() + floor).all():  # inf fails too
                    raise ValueError(f"{shard.name}: {key} did not survive the cast to {dtype}")
                count += 1
        save_file(cast, str(shard), metadata={"format": "pt"})
    config = json.loads((out_dir / "config.json").read_text())
    config["dtype"] = dtype
    config.pop("torch_dtype", None)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return count


def _weight(tensors: dict[str, torch.Tensor], prefix: str, algo: str, group: int) -> torch.Tensor:
    w = tensors[prefix + ".weight"]
    scale = tensors.get(prefix + ".weight_scale")
    if w.dtype == torch.uint8:  # int4, two per byte along the output
        weight = unpack_int4(w.view(torch.int8)) * scale.float().repeat_interleave(group, dim=1)
        scale2 = tensors.get(prefix + ".weight_scale_2")
        if algo == "W4A8_AWQ" and scale2 is not None:
            weight = fp8_round(weight / scale2.float()) * scale2.float()
        return weight
    if w.dtype == torch.int8:
        return w.float() * scale.float().reshape(-1, 1)
    if w.dtype == torch.float8_e4m3fn:
        return w.float() * scale.float()
    return w.float()


def dequantize_unified(ckpt_dir: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor],
                                                 dict[str, tuple[torch.Tensor | None, torch.Tensor]]]:
    """A unified checkpoint's tensors in float32 under the checkpoint's own names, whatever model they belong to (a
    whole VLM: its float vision tower and projector as stored): (hf_quant_config's ``quantization``, the state, the
    activation quantizers of the linears whose inputs the engine quantizes). Quantized weights are dequantized (AWQ
    pre-quant scales folded in where activations are not quantized); scales are left out."""
    from safetensors.torch import load_file

    ckpt_dir = Path(ckpt_dir)
    quant = json.loads((ckpt_dir / "hf_quant_config.json").read_text())["quantization"]
    algo, group = quant["quant_algo"], int(quant.get("group_size") or 128)
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(ckpt_dir.glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    quantized = {key.removesuffix(".weight_scale") for key in tensors if key.endswith(".weight_scale")}
    state: dict[str, torch.Tensor] = {}
    activations: dict[str, tuple[torch.Tensor | None, torch.Tensor]] = {}
    for name in quantized:
        state[name + ".weight"] = _weight(tensors, name, algo, group)
        pqs, act = tensors.get(name + ".pre_quant_scale"), tensors.get(name + ".input_scale")
        if act is not None:
            activations[name] = (None if pqs is None else pqs.float(), act.float().reshape(-1)[0])
        elif pqs is not None:
            state[name + ".weight"] = state[name + ".weight"] * pqs.float()[None, :]
    for key, value in tensors.items():
        if not key.endswith(SCALES) and key not in state:
            state[key] = value.float() if value.is_floating_point() else value
    quant["kv_scales"] = {k.rpartition(".")[2]: float(v.float().reshape(-1)[0]) for k, v in tensors.items()
                          if ".layers.0." in k and k.endswith(("k_scale", "v_scale"))}
    return quant, state, activations


def read_back_unified(ckpt_dir: Path, hf_config: Any, model_cls: type, device: str | torch.device = "cpu") -> Readback:
    """The unified checkpoint as a float32 ``model_cls`` computing what the engine computes (weights dequantized,
    inputs quantized with their ``input_scale`` after ``pre_quant_scale``)."""
    from safetensors.torch import load_file

    ckpt_dir = Path(ckpt_dir)
    quant = json.loads((ckpt_dir / "hf_quant_config.json").read_text())["quantization"]
    algo, group = quant["quant_algo"], int(quant.get("group_size") or 128)
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(ckpt_dir.glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    with torch.device(device):
        model = model_cls._from_config(hf_config, dtype=torch.float32).eval()
    linears = {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    state: dict[str, torch.Tensor] = {}
    activations: dict[str, tuple[torch.Tensor | None, torch.Tensor]] = {}
    for name in linears:
        if name + ".weight" not in tensors:
            continue
        state[name + ".weight"] = _weight(tensors, name, algo, group)
        if name + ".bias" in tensors:
            state[name + ".bias"] = tensors[name + ".bias"].float()
        pqs, act = tensors.get(name + ".pre_quant_scale"), tensors.get(name + ".input_scale")
        if act is not None:
            activations[name] = (None if pqs is None else pqs.float(), act.float().reshape(-1)[0])
        elif pqs is not None:  # AWQ without activation quantization: fold it into the weight
            state[name + ".weight"] = state[name + ".weight"] * pqs.float()[None, :]
    for key, value in tensors.items():
        if not key.endswith(SCALES) and key not in state and value.is_floating_point():
            state[key] = value.float()
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if "rotary" not in k and not (k == "lm_head.weight" and hf_config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"unified read-back does not fit {model_cls.__name__}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    model.tie_weights()
    kv = {k.rpartition(".")[2]: float(v.float().reshape(-1)[0]) for k, v in tensors.items()
          if ".layers.0." in k and k.endswith(("k_scale", "v_scale"))}
    readback = Readback(model=model, quant_algo=algo, kv_cache_quant_algo=quant.get("kv_cache_quant_algo"),
                        activations=activations, kv_scales=kv, ranks=1, tensors=len(tensors))
    simulate_activations(readback)
    return readback

