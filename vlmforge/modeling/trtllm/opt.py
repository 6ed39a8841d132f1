"""OPT -> TensorRT-LLM checkpoint without tensorrt_llm (ModelOpt has no OPT exporter).

Mirrors ``examples/models/contrib/opt/convert_checkpoint.py`` (TensorRT-LLM 1.2, ``convert_hf_opt``): the same
tensor names and TP splits (q/k/v concatenated and split per head group, ``out_proj``/``fc2`` split on the input,
``fc1`` and the head on the output, position table without HF's 2-row offset, project_in/out of opt-350m folded
into the tables). Two differences, both deliberate: weight-only formats are written as fp16 weights with
``quant_algo`` W8A16/W4A16 (what quantize.py writes for every model: TensorRT-LLM's ``weight_only_quantize_dict``
quantizes them when it builds, so the script's tensorrt_llm-only quantize op is not needed), and
``intermediate_size`` is written (the script leaves it out, and TensorRT-LLM's OPT then assumes 4 x hidden).
TensorRT-LLM's OPT has no pipeline parallelism (the script asserts pp_size == 1).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from vlmforge.modeling.trtllm.config import QUANT_ALGO
from vlmforge.specs.schema import QuantMethod


def _split(tensor: torch.Tensor, tp: int, rank: int, dim: int) -> torch.Tensor:
    return torch.chunk(tensor, tp, dim=dim)[rank].contiguous() if tp > 1 else tensor.contiguous()


def _pad_rows(tensor: torch.Tensor, multiple: int) -> torch.Tensor:
    pad = (-tensor.shape[0]) % multiple
    return torch.nn.functional.pad(tensor, (0, 0, 0, pad)) if pad else tensor


def export_opt(llm: torch.nn.Module, out_dir: Path, *, dtype: str, tp: int, pp: int = 1,
               method: QuantMethod = QuantMethod.NONE) -> dict[str, Any]:
    """Write ``llm`` (an ``OPTForCausalLM``) as a TensorRT-LLM checkpoint; returns config.json."""
    from safetensors.torch import save_file

    if pp != 1:
        raise ValueError("TensorRT-LLM's OPT has no pipeline parallelism (its converter asserts pp_size == 1)")
    if method not in (QuantMethod.NONE, QuantMethod.INT8_WO, QuantMethod.INT4_WO):
        raise ValueError(f"{method.value}: TensorRT-LLM's OPT converter writes float and weight-only checkpoints only")
    cfg = llm.config  # type: ignore[attr-defined]
    hidden, heads = cfg.hidden_size, cfg.num_attention_heads
    if heads % tp or cfg.ffn_dim % tp:
        raise ValueError(f"tp={tp} must divide OPT's {heads} heads and ffn_dim {cfg.ffn_dim}")
    torch_dtype = getattr(torch, dtype)
    params = {k: v.detach().to("cpu", torch_dtype) for k, v in llm.state_dict().items()}
    base = "model.decoder."
    parallel_embedding = False  # the converter's default (--use_parallel_embedding unset)
    embed = params[base + "embed_tokens.weight"]
    if base + "project_in.weight" in params:  # opt-350m: word_embed_proj_dim != hidden
        head = (embed.float() @ params[base + "project_out.weight"].float()).to(torch_dtype)
        embed = (embed.float() @ params[base + "project_in.weight"].float().t()).to(torch_dtype)
    else:
        head = params.get("lm_head.weight", embed)
    config: dict[str, Any] = {
        "architecture": "OPTForCausalLM",
        "dtype": dtype,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": heads,
        "hidden_size": hidden,
        "intermediate_size": cfg.ffn_dim,
        "vocab_size": cfg.vocab_size,
        "position_embedding_type": "learned_absolute",
        "max_position_embeddings": cfg.max_position_embeddings,
        "hidden_act": cfg.activation_function,
        "logits_dtype": "float16",
        "quantization": {"quant_algo": QUANT_ALGO[method]},
        "mapping": {"world_size": tp, "tp_size": tp, "pp_size": 1},
        "use_parallel_embedding": parallel_embedding,
        "embedding_sharding_dim": 0,
        "do_layer_norm_before": cfg.do_layer_norm_before,  # TensorRT-LLM's OPT defaults it to False
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config, indent=4))
    for rank in range(tp):
        w: dict[str, torch.Tensor] = {}
        for i in range(cfg.num_hidden_layers):
            src, dst = f"{base}layers.{i}.", f"transformer.layers.{i}."
            qkv = torch.cat([params[src + f"self_attn.{x}_proj.weight"] for x in "qkv"])
            qkv_bias = torch.cat([params[src + f"self_attn.{x}_proj.bias"] for x in "qkv"])
            # split_qkv_tp: (3, H, H) split on dim 1, so each rank holds [q_r; k_r; v_r]
            w[dst + "attention.qkv.weight"] = _split(qkv.reshape(3, hidden, hidden), tp, rank, 1).reshape(-1, hidden)
            w[dst + "attention.qkv.bias"] = _split(qkv_bias.reshape(3, hidden), tp, rank, 1).reshape(-1)
            w[dst + "attention.dense.weight"] = _split(params[src + "self_attn.out_proj.weight"], tp, rank, 1)
            w[dst + "attention.dense.bias"] = params[src + "self_attn.out_proj.bias"]
            w[dst + "mlp.fc.weight"] = _split(params[src + "fc1.weight"], tp, rank, 0)
            w[dst + "mlp.fc.bias"] = _split(params[src + "fc1.bias"], tp, rank, 0)
            w[dst + "mlp.proj.weight"] = _split(params[src + "fc2.weight"], tp, rank, 1)
            w[dst + "mlp.proj.bias"] = params[src + "fc2.bias"]
            for trt, hf in (("input_layernorm", "self_attn_layer_norm"), ("post_layernorm", "final_layer_norm")):
                w[dst + trt + ".weight"] = params[src + hf + ".weight"]
                w[dst + trt + ".bias"] = params[src + hf + ".bias"]
        w["lm_head.weight"] = _split(_pad_rows(head, tp), tp, rank, 0)
        w["transformer.vocab_embedding.weight"] = embed
        w["transformer.position_embedding.weight"] = params[base + "embed_positions.weight"][2:]  # HF offsets by 2
        if cfg.do_layer_norm_before:
            w["transformer.ln_f.weight"] = params[base + "final_layer_norm.weight"]
            w["transformer.ln_f.bias"] = params[base + "final_layer_norm.bias"]
        save_file({k: v.clone().contiguous() for k, v in w.items()}, str(out_dir / f"rank{rank}.safetensors"))
    return config
