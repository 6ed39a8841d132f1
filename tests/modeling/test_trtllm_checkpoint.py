"""TensorRT-LLM checkpoints at the torch level: the config check, the writers, and the read-back that catches a
checkpoint that does not hold the model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.modeling.test_modelopt import batches
from tests.modeling.test_quantized import tiny_llama
from vlmforge.modeling.trtllm.config import config_problems
from vlmforge.modeling.trtllm.export import export_modelopt, rope_theta, rotary_scaling, writer_for
from vlmforge.modeling.trtllm.opt import export_opt
from vlmforge.modeling.trtllm.readback import read_back, unpack_int4
from vlmforge.specs.schema import KvCacheDtype, QuantMethod

pytestmark = pytest.mark.container  # runs inside NVIDIA's TensorRT-LLM 1.2 image: CI runs it again there

GOOD = {"architecture": "LlamaForCausalLM", "dtype": "float16", "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "hidden_act": "silu", "logits_dtype": "float16",
        "position_embedding_type": "rope_gpt_neox", "mapping": {"world_size": 2, "tp_size": 2, "pp_size": 1},
        "quantization": {"quant_algo": "W4A16_AWQ", "kv_cache_quant_algo": "INT8", "group_size": 64,
                         "has_zero_point": False, "pre_quant_scale": True, "exclude_modules": ["lm_head"]}}


def tiny_opt(hidden: int = 64) -> torch.nn.Module:
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    config = OPTConfig(hidden_size=hidden, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
                       max_position_embeddings=64, word_embed_proj_dim=hidden)
    return OPTForCausalLM(config).eval()


def logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def test_the_int4_unpacking_is_modelopts() -> None:
    from modelopt.torch.export.quant_utils import pack_int4_in_uint8

    codes = torch.randint(-8, 8, (6, 64)).float()
    scale = torch.ones(6, 1)
    packed = pack_int4_in_uint8(codes, scale, 64)
    assert torch.equal(unpack_int4(packed), codes)


def test_config_problems() -> None:
    assert config_problems(GOOD, world_size=2) == []
    bad = {**GOOD, "quantization": {**GOOD["quantization"], "awq_block_size": 64, "quant_algo": "INT8"}}
    problems = " | ".join(config_problems(bad, world_size=1))
    assert "TypeError in trtllm-build" in problems and "awq_block_size" in problems
    assert "'INT8' is not a weight QuantAlgo" in problems and "2 ranks, the checkpoint has 1 rank files" in problems
    missing = {k: v for k, v in GOOD.items() if k not in ("hidden_act", "dtype")}
    problems = " | ".join(config_problems(missing))
    assert "missing required key dtype" in problems and "missing hidden_act (TensorRT-LLM's default 'gelu'" in problems
    odd = {**GOOD, "position_embedding_type": "rope", "mapping": {"world_size": 3, "tp_size": 3, "pp_size": 1}}
    problems = " | ".join(config_problems(odd))
    assert "'rope' is none of" in problems and "not divisible by tp_size 3" in problems


def test_rope_settings_of_transformers_5() -> None:
    llm = tiny_llama()
    assert rope_theta(llm.config) == 10000.0 and rotary_scaling(llm.config) is None
    llm.config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}
    assert rope_theta(llm.config) == 5e5 and rotary_scaling(llm.config) == {"type": "linear", "factor": 2.0}
    assert writer_for("llama") == "modelopt" and writer_for("opt") == "opt"
    with pytest.raises(ValueError, match="no TensorRT-LLM checkpoint writer for 'gpt2'"):
        writer_for("gpt2")


@pytest.mark.parametrize("tp", [1, 2])
def test_opt_converter_reads_back_as_the_model(tp: int, tmp_path: Path) -> None:
    opt = tiny_opt()
    config = export_opt(opt, tmp_path, dtype="float16", tp=tp)
    assert config_problems(config, world_size=tp) == []
    assert config["intermediate_size"] == 96 and config["do_layer_norm_before"] is True
    rank0 = load_file(str(tmp_path / "rank0.safetensors"))
    assert rank0["transformer.layers.0.attention.qkv.weight"].shape == (3 * 64 // tp, 64)
    assert rank0["transformer.layers.0.attention.dense.weight"].shape == (64, 64 // tp)
    assert rank0["transformer.position_embedding.weight"].shape[0] == 64  # HF's two offset rows dropped
    readback = read_back(tmp_path, opt.config, type(opt))
    batch = batches(1)[0]
    assert (logits(readback.model, batch) - logits(opt, batch)).abs().max().item() < 5e-3  # fp16 storage


def test_opt_refuses_what_tensorrt_llm_cannot_build(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no pipeline parallelism"):
        export_opt(tiny_opt(), tmp_path, dtype="float16", tp=1, pp=2)
    with pytest.raises(ValueError, match="fp8: TensorRT-LLM's OPT converter writes float and weight-only"):
        export_opt(tiny_opt(), tmp_path, dtype="float16", tp=1, method=QuantMethod.FP8)


@pytest.mark.parametrize(("tp", "pp"), [(2, 1), (1, 2)])
def test_modelopt_export_reads_back_and_a_damaged_one_does_not(tp: int, pp: int, tmp_path: Path) -> None:
    llm = tiny_llama()
    llm.config.architectures = ["LlamaForCausalLM"]
    config = export_modelopt(llm, tmp_path / "ok", dtype="float16", tp=tp, pp=pp, method=QuantMethod.INT8_WO,
                             kv_cache=KvCacheDtype.AUTO)
    assert config["quantization"]["quant_algo"] == "W8A16" and config["rotary_base"] == 10000.0
    assert config_problems(config, world_size=tp * pp) == [] and not (tmp_path / "ok" / "quant_cfg.json").exists()
    batch = batches(1)[0]
    readback = read_back(tmp_path / "ok", llm.config, type(llm))
    assert readback.ranks == tp * pp
    float_view = read_back(tmp_path / "ok", llm.config, type(llm))
    good = (logits(readback.model, batch) - logits(llm, batch)).abs().max().item()
    assert good < 0.1  # W8A16: trtllm-build's int8 rounding simulated
    # swap two rows of the last rank's fused q/k/v: the read-back sees a different model
    last = tmp_path / "ok" / f"rank{tp * pp - 1}.safetensors"
    tensors = load_file(str(last))
    qkv = tensors["transformer.layers.0.attention.qkv.weight"]
    tensors["transformer.layers.0.attention.qkv.weight"] = torch.cat([qkv[-8:], qkv[8:-8], qkv[:8]])
    save_file(tensors, str(last))
    damaged = read_back(tmp_path / "ok", llm.config, type(llm))
    assert (logits(damaged.model, batch) - logits(float_view.model, batch)).abs().max().item() > 10 * good


def test_a_checkpoint_missing_a_rank_is_refused(tmp_path: Path) -> None:
    opt = tiny_opt()
    export_opt(opt, tmp_path, dtype="float16", tp=2)
    (tmp_path / "rank1.safetensors").unlink()
    with pytest.raises(ValueError, match="mapping says 2 ranks but rank1.safetensors are missing"):
        read_back(tmp_path, opt.config, type(opt))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["mapping"] == {"world_size": 2, "tp_size": 2, "pp_size": 1}


def test_the_unified_cast_refuses_a_tensor_it_would_change(tmp_path: Path) -> None:
    from vlmforge.modeling.unified import cast_unified

    (tmp_path / "config.json").write_text('{"torch_dtype": "float32"}')
    save_file({"a.weight": torch.tensor([1.0, 3e-6, 1e-9]), "a.weight_scale": torch.tensor(1e-9)},
              str(tmp_path / "model.safetensors"))
    assert cast_unified(tmp_path, "float16") == 1  # subnormals round within the dtype's floor; scales stay float32
    stored = load_file(str(tmp_path / "model.safetensors"))
    assert stored["a.weight"].dtype == torch.float16 and stored["a.weight_scale"].dtype == torch.float32
    assert json.loads((tmp_path / "config.json").read_text()) == {"dtype": "float16"}
    save_file({"b.weight": torch.tensor([1e6])}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="b.weight did not survive the cast to float16"):
        cast_unified(tmp_path, "float16")
