"""ModelOpt recipes (TensorRT-LLM 1.2's, in both config forms), calibration, and the fake-quant LLM saved and restored."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from tests.modeling.test_quantized import tiny_llama
from vlmforge.errors import ToolchainUnavailable
from vlmforge.modeling import modelopt as mo
from vlmforge.specs.schema import KvCacheDtype, QuantMethod

pytestmark = pytest.mark.container  # runs inside NVIDIA's TensorRT-LLM 1.2 image: CI runs it again there


def batches(n: int = 2, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        mask = torch.ones(2, 12, dtype=torch.long)
        mask[0, :3] = 0
        out.append({"inputs_embeds": torch.randn(2, 12, 64, generator=g) * 0.5, "attention_mask": mask,
                    "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)})
    return out


def entries(cfg: dict) -> dict[str, dict]:
    return {e["quantizer_name"]: e for e in cfg["quant_cfg"]} if isinstance(cfg["quant_cfg"], list) else cfg["quant_cfg"]


def test_recipes_follow_quantize_py() -> None:
    awq = entries(mo.quant_config(QuantMethod.INT4_AWQ, group_size=64))
    assert awq["*weight_quantizer"]["cfg"]["block_sizes"][-1] == 64 and "-1" not in awq["*weight_quantizer"]["cfg"]["block_sizes"]
    w4a8 = entries(mo.quant_config(QuantMethod.W4A8_AWQ, group_size=32))
    assert w4a8["*weight_quantizer"]["cfg"][0]["block_sizes"][-1] == 32
    assert mo.quant_config(QuantMethod.FP8)["algorithm"] == "max"
    assert mo.quant_config(QuantMethod.INT8_SQ)["algorithm"] == "smoothquant"
    assert mo.quant_config(QuantMethod.INT4_AWQ)["algorithm"]["method"] == "awq_lite"
    assert mo.quant_config(QuantMethod.INT8_WO) is None and mo.quant_config(QuantMethod.NONE) is None
    # int8 KV: the attention's k/v matmul inputs (1.2's k_proj.output_quantizer entries export no KV scales)
    kv = entries(mo.quant_config(QuantMethod.INT4_WO, KvCacheDtype.INT8))
    assert kv["*[kv]_bmm_quantizer"]["cfg"] == {"num_bits": 8, "axis": None} and kv["*"]["enable"] is False
    assert entries(mo.quant_config(QuantMethod.NONE, KvCacheDtype.FP8))["*[kv]_bmm_quantizer"]["cfg"]["num_bits"] == (4, 3)


def test_recipes_in_the_dict_form_of_modelopt_0_37() -> None:
    """NVIDIA's 1.2 image has ModelOpt 0.37, whose presets are {pattern: attributes} dicts."""
    legacy = {"quant_cfg": {"*weight_quantizer": [{"num_bits": 4, "block_sizes": {-1: 128}}, {"num_bits": (4, 3)}],
                            "*input_quantizer": {"enable": False}}, "algorithm": "awq_lite"}
    cfg = copy.deepcopy(legacy)
    mo._set_block_size(cfg, 64)
    mo._add_entries(cfg, mo.KV_ENTRIES[KvCacheDtype.INT8])
    assert cfg["quant_cfg"]["*weight_quantizer"][0]["block_sizes"] == {-1: 64}
    assert cfg["quant_cfg"]["*[kv]_bmm_quantizer"] == {"num_bits": 8, "axis": None, "enable": True}


def test_calibrate_save_and_restore(tmp_path: Path) -> None:
    llm = tiny_llama()
    ref = llm(**batches(1, seed=9)[0]).logits
    assert mo.calibrate(llm, QuantMethod.INT4_AWQ, KvCacheDtype.INT8, 32, batches())
    assert mo.quantizer_summary(llm) == {"weight": 14, "k_bmm": 2, "v_bmm": 2}  # AWQ's inputs: scaled, not quantized
    with torch.no_grad():
        fq = llm(**batches(1, seed=9)[0]).logits
    assert 0 < (fq - ref).abs().max().item() < 1.0
    meta = mo.save_fake_quant(llm, tmp_path / "llm", torch.float32)
    assert meta["modelopt"] == mo.require_modelopt()
    restored = mo.load_fake_quant(type(llm), tmp_path / "llm", torch.float32)
    with torch.no_grad():
        again = restored(**batches(1, seed=9)[0]).logits
    assert torch.equal(again, fq)
    half = mo.load_fake_quant(type(llm), tmp_path / "llm", torch.float16)  # its pre-quant scales follow the dtype
    with torch.no_grad():
        out = half(**{k: v.half() if v.is_floating_point() else v for k, v in batches(1, seed=9)[0].items()}).logits
    assert out.dtype == torch.float16 and (out.float() - fq).abs().max().item() < 0.05
    with mo.kv_cache_quantizers_off(llm):
        assert mo.quantizer_summary(llm) == {"weight": 14}
    assert mo.quantizer_summary(llm)["k_bmm"] == 2


def test_weight_only_calibrates_nothing() -> None:
    llm = tiny_llama()
    assert not mo.calibrate(llm, QuantMethod.INT8_WO, KvCacheDtype.AUTO, 128, batches())
    assert mo.quantizer_summary(llm) == {}


def test_a_fake_quant_llm_restores_only_in_its_modelopt_version(tmp_path: Path) -> None:
    llm = tiny_llama()
    mo.calibrate(llm, QuantMethod.FP8, KvCacheDtype.AUTO, 128, batches(1))
    mo.save_fake_quant(llm, tmp_path / "llm", torch.float32)
    meta = json.loads((tmp_path / "llm" / "modelopt.json").read_text())
    (tmp_path / "llm" / "modelopt.json").write_text(json.dumps({**meta, "modelopt": "0.37.0"}))
    with pytest.raises(ToolchainUnavailable, match="quantized with ModelOpt 0.37.0"):
        mo.load_fake_quant(type(llm), tmp_path / "llm", torch.float32)


@pytest.mark.parametrize("method", [QuantMethod.FP8, QuantMethod.INT8_SQ])
def test_layer_norms_are_not_quantized(method: QuantMethod) -> None:
    """The presets' *input_quantizer pattern also enables ModelOpt's QuantLayerNorm input quantizer (OPT's norms),
    which no engine has and neither export writes a scale for: the fake-quant model then computed something else
    (read-back differences of 0.06-0.13 on the tiny OPT)."""
    from tests.modeling.test_trtllm_checkpoint import tiny_opt

    opt = tiny_opt()
    mo.calibrate(opt, method, KvCacheDtype.AUTO, 32, batches(1))
    norms = {name for name, module in opt.named_modules() if isinstance(module, torch.nn.LayerNorm)}
    enabled = [name for name, quantizer in mo._quantizers(opt) if quantizer.is_enabled and name.rpartition(".")[0] in norms]
    assert norms and enabled == []
    assert mo.quantizer_summary(opt)["input"] == 12  # the linears' inputs still are


def _exported(module: torch.nn.Module) -> torch.Tensor:
    """What ModelOpt's exporters write for ``module``'s weight (int8 codes or FP8 values, times the scale)."""
    from modelopt.torch.export.quant_utils import get_quantization_format, get_weight_scaling_factor, to_quantized_weight

    scale = get_weight_scaling_factor(module).float()
    codes = to_quantized_weight(module.weight.detach().float(), scale, get_quantization_format(module)).float()
    return codes * (scale.reshape(-1, 1) if scale.numel() > 1 else scale.reshape(()))


def _put_on_a_tie(module: torch.nn.Module) -> None:
    """Set one weight of ``module`` next to a rounding tie of the exporter's ``w / s`` (within one float32 step of
    -60.5 codes) where the fake-quant forward's ``w * (127 / amax)`` gives the other code."""
    scales = module.weight_quantizer.amax.reshape(-1).float() / 127
    with torch.no_grad():
        for row, scale in enumerate(scales):
            tie = torch.tensor(-60.5) * scale
            for w in (tie, torch.nextafter(tie, tie - 1), torch.nextafter(tie, tie + 1)):
                module.weight[row, 0] = w
                fake = torch.round(module.weight_quantizer(module.weight)[row, 0] / scale)
                if fake != torch.round(_exported(module)[row, 0] / scale):
                    return
    raise AssertionError("no weight next to a tie rounds differently in this layer")


def test_weights_are_rounded_as_the_exporter_rounds_them() -> None:
    """A weight on a rounding tie: ModelOpt's fake-quant forward and its exporter gave codes one step apart, and
    with int8 activations downstream the checkpoint's read-back then differed by 0.062 (tiny-vila int8_sq)."""
    llm = tiny_llama()
    mo.calibrate(llm, QuantMethod.INT8_SQ, KvCacheDtype.AUTO, 128, batches())
    q_proj = llm.model.layers[0].self_attn.q_proj
    _put_on_a_tie(q_proj)
    assert not torch.equal(q_proj.weight_quantizer(q_proj.weight), _exported(q_proj))
    linears = [m for m in llm.modules() if isinstance(m, torch.nn.Linear) and m.weight_quantizer.is_enabled]
    exported = [_exported(m) for m in linears]
    assert mo.round_weights_as_exported(llm) == len(linears) == 14
    with torch.no_grad():
        for module, want in zip(linears, exported, strict=True):
            assert torch.equal(module.weight, want)
            # the forward keeps every code (one code off is 1/128 of the row's amax; float32 ulps remain)
            torch.testing.assert_close(module.weight_quantizer(module.weight), want, rtol=1e-6, atol=1e-9)
    fp8 = tiny_llama()
    mo.calibrate(fp8, QuantMethod.FP8, KvCacheDtype.AUTO, 128, batches(1))
    down = fp8.model.layers[1].mlp.down_proj
    want = _exported(down)
    assert mo.round_weights_as_exported(fp8) == 14 and torch.equal(down.weight, want)
