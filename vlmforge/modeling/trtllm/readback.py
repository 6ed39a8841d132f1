"""Read a TensorRT-LLM checkpoint back into a transformers model: the check that it encodes what was calibrated.

Every rank's tensors are loaded, the pipeline and tensor-parallel splits undone, the layout mapped back
(fused q/k/v, gate/up named fc/gate, OPT's position offset), the weights dequantized (int4 nibbles and group
scales, per-channel int8, per-tensor FP8, pre-quant scales) and put into a float32 transformers model. For the
formats that quantize activations (int8_sq, fp8, w4a8_awq) :func:`simulate_activations` quantizes each linear's
input with the checkpoint's own activation scale, as the engine does; for W8A16/W4A16 (fp16 weights) the
per-channel rounding ``trtllm-build`` applies is simulated per rank. The KV cache's quantization is not simulated
(its scales are read and reported).

HF convention ``y = x @ W.T``; ``s`` = weights_scaling_factor, ``p`` = prequant_scaling_factor, ``a`` =
activation_scaling_factor. int4 (W4A16_AWQ, W4A8_AWQ): an int8 tensor [O/2, I] whose byte j holds W[2j] in the low
nibble and W[2j+1] in the high one (two's complement), ``W' = q * s`` per group; W4A8 then rounds ``W'/s2`` to FP8.
The engine computes ``(x * p) @ W'.T``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

F8_MAX = 448.0
LLAMA_LINEARS = {  # TensorRT-LLM linear -> (transformers modules, TP kind)
    "attention.qkv": (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "col"),
    "attention.dense": (("self_attn.o_proj",), "row"),
    "mlp.fc": (("mlp.gate_proj",), "col"),  # TensorRT-LLM's GatedMLP: act(fc(x)) * gate(x)
    "mlp.gate": (("mlp.up_proj",), "col"),
    "mlp.proj": (("mlp.down_proj",), "row"),
}
OPT_LINEARS = {
    "attention.qkv": (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "col"),
    "attention.dense": (("self_attn.out_proj",), "row"),
    "mlp.fc": (("fc1",), "col"),
    "mlp.proj": (("fc2",), "row"),
}
_LAYER = re.compile(r"^transformer\.layers\.(\d+)\.")


@dataclass
class Readback:
    """A checkpoint read back: the float32 model, its activation quantizers, and what the config says."""

    model: torch.nn.Module
    quant_algo: str | None
    kv_cache_quant_algo: str | None
    activations: dict[str, tuple[torch.Tensor | None, torch.Tensor]] = field(default_factory=dict)
    """transformers linear -> (pre-quant scale or None, activation scale): the inputs the engine quantizes."""
    kv_scales: dict[str, float] = field(default_factory=dict)
    """Layer 0's KV-cache scaling factors (reported, not simulated)."""
    ranks: int = 1
    tensors: int = 0


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """ModelOpt's TensorRT-LLM int4 packing [O/2, I] -> float codes [O, I] in [-8, 7]."""
    b = packed.view(torch.uint8).to(torch.int16)
    low, high = b & 0x0F, (b >> 4) & 0x0F
    low = torch.where(low >= 8, low - 16, low)
    high = torch.where(high >= 8, high - 16, high)
    return torch.stack([low, high], dim=1).reshape(packed.shape[0] * 2, packed.shape[1]).float()


def fp8_round(x: torch.Tensor) -> torch.Tensor:
    return torch.clamp(x, -F8_MAX, F8_MAX).to(torch.float8_e4m3fn).float()


def trtllm_weight_only(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """What trtllm-build does to one rank's fp16 weight for W8A16/W4A16 (symmetric_quantize, per output channel):
    ``scale = absmax / 2^(bits-1)``, ``q = clamp(round(w / scale))``."""
    half = 2 ** (bits - 1)
    scale = weight.abs().amax(dim=1, keepdim=True) / half
    q = torch.where(scale != 0, torch.round(weight / scale), torch.zeros_like(weight)).clamp(-half, half - 1)
    return q * scale


ROW_PARALLEL = ("self_attn.o_proj", "mlp.down_proj", "self_attn.out_proj", "fc2")
"""transformers linears whose input TensorRT-LLM splits across TP ranks (attention.dense, mlp.proj)."""


def simulate_weight_only(model: torch.nn.Module, bits: int, tp: int, dtype: str) -> None:
    """Round ``model``'s decoder-layer weights in place as trtllm-build does for W8A16/W4A16: the checkpoint's
    ``dtype`` first, then per output channel on each TP rank's slice (row-parallel layers' inputs are split)."""
    storage = getattr(torch, dtype)
    with torch.no_grad():
        for name, module in model.named_modules():
            if not isinstance(module, torch.nn.Linear) or ".layers." not in name:
                continue
            weight = module.weight.to(storage).float()
            if name.endswith(ROW_PARALLEL) and tp > 1:
                rounded = torch.cat([trtllm_weight_only(part, bits) for part in torch.chunk(weight, tp, dim=1)], dim=1)
            else:
                rounded = trtllm_weight_only(weight, bits)
            module.weight.copy_(rounded.to(module.weight.dtype))


def _dequant(tensors: dict[str, torch.Tensor], prefix: str, algo: str | None, group: int) -> dict[str, Any]:
    """One rank's linear: ``weight`` W' (float32, what the engine multiplies by), ``pqs``, ``act``, ``bias``."""
    w = tensors[prefix + ".weight"]
    s = tensors.get(prefix + ".weights_scaling_factor")
    if algo in ("W4A16_AWQ", "W4A8_AWQ") and w.dtype == torch.int8:
        weight = unpack_int4(w) * s.float().repeat_interleave(group, dim=1)
        s2 = tensors.get(prefix + ".weights_scaling_factor_2")
        if algo == "W4A8_AWQ" and s2 is not None:
            scale2 = s2.float().reshape(-1)[0]
            weight = fp8_round(weight / scale2) * scale2
    elif w.dtype == torch.int8 and s is not None:  # int8_sq: per output channel
        weight = w.float() * s.float().reshape(-1, 1)
    elif w.dtype == torch.float8_e4m3fn:
        weight = w.float() * s.float().reshape(-1)[0]
    else:
        weight = w.float()
        if algo in ("W8A16", "W4A16"):
            weight = trtllm_weight_only(weight, 8 if algo == "W8A16" else 4)
    pqs, act, bias = (tensors.get(prefix + suffix) for suffix in
                      (".prequant_scaling_factor", ".activation_scaling_factor", ".bias"))
    return {"weight": weight, "pqs": None if pqs is None else pqs.float(),
            "act": None if act is None else act.float().reshape(-1)[0], "bias": None if bias is None else bias.float()}


def _merge(parts: list[dict[str, Any]], kind: str, qkv_rows: tuple[int, int, int] | None) -> dict[str, Any]:
    """Undo the TP split: row-parallel layers concatenate inputs (and pre-quant scales), column-parallel outputs
    (q/k/v per rank first split into its q, k and v rows)."""
    acts = {float(p["act"]) for p in parts if p["act"] is not None}
    if len(acts) > 1:
        raise ValueError(f"the activation scale differs across ranks: {sorted(acts)}")
    out: dict[str, Any] = {"act": parts[0]["act"]}
    if kind == "row":
        out["weight"] = torch.cat([p["weight"] for p in parts], dim=1)
        out["pqs"] = torch.cat([p["pqs"] for p in parts]) if parts[0]["pqs"] is not None else None
        out["bias"] = parts[0]["bias"]  # added once, after the all-reduce
        return out
    out["pqs"] = parts[0]["pqs"]
    if qkv_rows is None:
        out["weight"] = torch.cat([p["weight"] for p in parts])
        out["bias"] = torch.cat([p["bias"] for p in parts]) if parts[0]["bias"] is not None else None
        return out
    pieces = [torch.split(p["weight"], list(qkv_rows)) for p in parts]
    out["weight"] = torch.cat([piece[i] for i in range(3) for piece in pieces])
    if parts[0]["bias"] is not None:
        biases = [torch.split(p["bias"], list(qkv_rows)) for p in parts]
        out["bias"] = torch.cat([b[i] for i in range(3) for b in biases])
    else:
        out["bias"] = None
    return out


def load_ranks(ckpt_dir: Path) -> tuple[dict[str, Any], list[dict[str, torch.Tensor]]]:
    """config.json and every rank's tensors, in rank order; refuses a checkpoint with missing rank files."""
    from safetensors.torch import load_file

    ckpt_dir = Path(ckpt_dir)
    config = json.loads((ckpt_dir / "config.json").read_text())
    mapping = config.get("mapping") or {}
    world = mapping.get("tp_size", 1) * mapping.get("pp_size", 1)
    files = [ckpt_dir / f"rank{r}.safetensors" for r in range(world)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ValueError(f"{ckpt_dir}: mapping says {world} ranks but {', '.join(missing)} are missing")
    extra = sorted(p.name for p in ckpt_dir.glob("rank*.safetensors") if p not in files)
    if extra:
        raise ValueError(f"{ckpt_dir}: rank files beyond the mapping's {world}: {', '.join(extra)}")
    return config, [load_file(str(f)) for f in files]


def read_back(ckpt_dir: Path, hf_config: Any, model_cls: type, device: str | torch.device = "cpu") -> Readback:
    """The checkpoint in ``ckpt_dir`` as a float32 ``model_cls`` (``hf_config``: the LLM's transformers config) that
    computes what the engine computes: activation quantization included (:func:`simulate_activations`)."""
    config, ranks = load_ranks(ckpt_dir)
    quant = config.get("quantization") or {}
    algo, group = quant.get("quant_algo"), int(quant.get("group_size") or 128)
    tp, pp = config["mapping"]["tp_size"], config["mapping"].get("pp_size", 1)
    is_opt = hf_config.model_type == "opt"
    linears = OPT_LINEARS if is_opt else LLAMA_LINEARS
    base = "model.decoder" if is_opt else "model"
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_size = config.get("head_size") or config["hidden_size"] // heads
    if kv_heads % tp:
        raise ValueError(f"read-back of {kv_heads} KV heads over tp={tp} (replicated KV heads) is not supported")
    qkv_rows = (heads // tp * head_size, kv_heads // tp * head_size, kv_heads // tp * head_size)
    stages = [ranks[p * tp:(p + 1) * tp] for p in range(pp)]  # rank = pp_rank * tp + tp_rank
    state: dict[str, torch.Tensor] = {}
    activations: dict[str, tuple[torch.Tensor | None, torch.Tensor]] = {}
    layer = 0
    for stage in stages:
        local = sorted({int(m.group(1)) for key in stage[0] if (m := _LAYER.match(key))})
        for i in local:
            hf_layer = f"{base}.layers.{layer + i}"
            for trt_name, (hf_names, kind) in linears.items():
                parts = [_dequant(r, f"transformer.layers.{i}.{trt_name}", algo, group) for r in stage]
                merged = _merge(parts, kind, qkv_rows if trt_name == "attention.qkv" else None)
                pqs, act = merged["pqs"], merged["act"]
                weight = merged["weight"] * pqs[None, :] if pqs is not None and act is None else merged["weight"]
                sizes = [heads * head_size, kv_heads * head_size, kv_heads * head_size] if len(hf_names) == 3 else None
                weights = torch.split(weight, sizes) if sizes else (weight,)
                biases = torch.split(merged["bias"], sizes) if sizes and merged["bias"] is not None else (
                    (merged["bias"],) * len(hf_names))
                for hf_name, w, b in zip(hf_names, weights, biases, strict=True):
                    state[f"{hf_layer}.{hf_name}.weight"] = w
                    if b is not None:
                        state[f"{hf_layer}.{hf_name}.bias"] = b
                    if act is not None:
                        activations[f"{hf_layer}.{hf_name}"] = (pqs, act)
            norms = {"input_layernorm": "self_attn_layer_norm" if is_opt else "input_layernorm",
                     "post_layernorm": "final_layer_norm" if is_opt else "post_attention_layernorm"}
            for trt_norm, hf_norm in norms.items():
                for suffix in ("weight", "bias"):
                    key = f"transformer.layers.{i}.{trt_norm}.{suffix}"
                    if key in stage[0]:
                        state[f"{hf_layer}.{hf_norm}.{suffix}"] = stage[0][key].float()
        layer += len(local)
    if layer != hf_config.num_hidden_layers:
        raise ValueError(f"the checkpoint holds {layer} layers, the model has {hf_config.num_hidden_layers}")
    first, last = stages[0], stages[-1]
    vocab = hf_config.vocab_size
    embed = first[0]["transformer.vocab_embedding.weight"]
    if config.get("use_parallel_embedding") and tp > 1:
        embed = torch.cat([r["transformer.vocab_embedding.weight"] for r in first])
    head = torch.cat([r["lm_head.weight"] for r in last]) if "lm_head.weight" in last[0] else embed
    state[f"{base}.embed_tokens.weight"] = embed[:vocab].float()  # AWQ exports pad the vocabulary to 64
    state["lm_head.weight"] = head[:vocab].float()
    norm = "final_layer_norm" if is_opt else "norm"
    for suffix in ("weight", "bias"):
        if f"transformer.ln_f.{suffix}" in last[0]:
            state[f"{base}.{norm}.{suffix}"] = last[0][f"transformer.ln_f.{suffix}"].float()
    if is_opt:
        positions = first[0]["transformer.position_embedding.weight"].float()
        state[f"{base}.embed_positions.weight"] = torch.cat([torch.zeros(2, positions.shape[1]), positions])
    with torch.device(device):
        model = model_cls._from_config(hf_config, dtype=torch.float32).eval()
    model.config.tie_word_embeddings = False  # the head read back is its own tensor
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if "rotary" not in k]
    if missing or unexpected:
        raise ValueError(f"read-back does not fit {model_cls.__name__}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    kv = {k.removeprefix("transformer.layers.0.attention."): float(v.float().reshape(-1)[0])
          for k, v in ranks[0].items() if k.startswith("transformer.layers.0.") and "cache_scaling" in k}
    readback = Readback(model=model, quant_algo=algo, kv_cache_quant_algo=quant.get("kv_cache_quant_algo"),
                        activations=activations, kv_scales=kv, ranks=len(ranks), tensors=sum(len(r) for r in ranks))
    simulate_activations(readback)
    return readback


def _quantize_input(algo: str | None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if algo == "W8A8_SQ_PER_CHANNEL":
        return lambda x, a: torch.clamp(torch.round(x / a), -128, 127) * a
    return lambda x, a: fp8_round(x / a) * a  # FP8, W4A8_AWQ


def simulate_activations(readback: Readback) -> list[Any]:
    """Quantize each linear's input as the engine does: ``q(x * p; a) @ W'.T``. Returns the hook handles."""
    quantize = _quantize_input(readback.quant_algo)
    handles = []
    for name, module in readback.model.named_modules():
        if name not in readback.activations:
            continue
        pqs, act = readback.activations[name]

        def hook(_: Any, args: tuple[Any, ...], pqs: torch.Tensor | None = pqs, act: torch.Tensor = act) -> Any:
            x = args[0] * pqs if pqs is not None else args[0]
            return (quantize(x, act),) + tuple(args[1:])

        handles.append(module.register_forward_pre_hook(hook))
    return handles
