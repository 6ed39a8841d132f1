"""Weight-only int8/int4 on torch's low-bit kernels: the kernels compute what the stored codes say."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from vlmforge.modeling.quantized import (
    Int4Linear,
    Int8Linear,
    dequantize_int4,
    int4_fits,
    load_quantized,
    lowbit_kernels,
    pack_int4,
    quantize_and_save,
    quantize_int4,
    quantize_int8,
    read_meta,
    unpack_int4,
)


def tiny_llama(hidden: int = 64, inter: int = 96) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def test_int4_packing_round_trips_and_puts_even_columns_high() -> None:
    codes = torch.randint(0, 16, (8, 32), dtype=torch.int32)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (8, 16)
    assert torch.equal(unpack_int4(packed), codes)
    assert int(packed[0, 0]) == int(codes[0, 0]) << 4 | int(codes[0, 1])  # what _convert_weight_to_int4pack takes


def test_quantization_error_is_within_half_a_step() -> None:
    w = torch.randn(16, 128)
    codes, scale = quantize_int8(w)
    assert (codes.float() * scale[:, None] - w).abs().max() <= scale.max() / 2 + 1e-6
    packed, s, z = quantize_int4(w, 64)
    step = s.repeat_interleave(64, dim=1)
    assert ((dequantize_int4(packed, s, z, 64) - w).abs() <= step / 2 + 1e-6).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_kernels_compute_the_dequantized_product(dtype: torch.dtype) -> None:
    torch.manual_seed(1)
    w, bias, x = torch.randn(48, 128), torch.randn(48), torch.randn(2, 5, 128)
    codes, scale = quantize_int8(w)
    int8 = Int8Linear(codes, scale, bias.to(dtype))
    expected8 = x @ (codes.float() * scale[:, None]).T + bias
    packed, s, z = quantize_int4(w, 32)
    int4 = Int4Linear(packed, s, z, 32, bias.to(dtype), torch.device("cpu"), dtype)
    expected4 = x @ dequantize_int4(packed, s, z, 32).T + bias
    tolerance = 1e-4 if dtype == torch.float32 else 0.15  # half-precision activations and accumulation
    for module, expected in ((int8, expected8), (int4, expected4)):
        got = module(x.to(dtype))
        assert got.dtype == dtype and got.shape == (2, 5, 48)
        assert (got.float() - expected).abs().max().item() < tolerance * max(1.0, expected.abs().max().item() / 10)


def test_save_and_load_a_whole_llm(tmp_path: Path) -> None:
    llm = tiny_llama()
    x = torch.randn(1, 7, 64) * 0.1
    with torch.no_grad():
        ref = llm(inputs_embeds=x).logits
    meta = quantize_and_save(llm, tmp_path / "int4", "int4", group_size=32)
    assert read_meta(tmp_path / "int4")["weights"] == "int4" and meta["aliases"] == {}
    loaded = load_quantized(type(llm), tmp_path / "int4", torch.float32)
    assert lowbit_kernels(loaded) == {"_weight_int4pack_mm_for_cpu": 14, "float": 1}
    with torch.no_grad():
        got = loaded(inputs_embeds=x).logits
    assert 0 < (got - ref).abs().max().item() < 0.5  # quantized, and close
    assert all(p.requires_grad is False or p.dtype.is_floating_point for p in loaded.parameters())


def test_shapes_the_int4_kernel_cannot_take_stay_float(tmp_path: Path) -> None:
    assert not int4_fits(96, 64, 64) and int4_fits(128, 64, 64) and not int4_fits(128, 60, 64)
    llm = tiny_llama(hidden=64, inter=96)  # down_proj's input (96) is no multiple of 64
    meta = quantize_and_save(llm, tmp_path / "q", "int4", group_size=64)
    assert sorted(meta["kept_float"]) == [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    loaded = load_quantized(type(llm), tmp_path / "q", torch.float32)
    assert isinstance(loaded.model.layers[0].mlp.down_proj, torch.nn.Linear)
    assert isinstance(loaded.model.layers[0].mlp.up_proj, Int4Linear)


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="int8 or int4"):
        quantize_and_save(tiny_llama(), tmp_path / "a", "int2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="group size 48"):
        quantize_and_save(tiny_llama(), tmp_path / "b", "int4", group_size=48)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "lowbit.json").write_text('{"format": "quanto"}')
    with pytest.raises(ValueError, match="expected vlmforge-lowbit-1"):
        read_meta(tmp_path / "c")


def test_bfloat16_int8_weights_loaded_from_safetensors_run(tmp_path: Path) -> None:
    """torch 2.13's CPU bfloat16 int8 kernel crashed the process (SIGSEGV) on weights at the unaligned offsets
    safetensors hands out: the loader copies them. Run in a child process, so a crash is a failure, not the end."""
    quantize_and_save(tiny_llama(), tmp_path / "int8", "int8")
    script = textwrap.dedent(f"""
        import torch
        from transformers import LlamaForCausalLM
        from vlmforge.modeling.quantized import load_quantized
        llm = load_quantized(LlamaForCausalLM, {str(tmp_path / "int8")!r}, torch.bfloat16)
        with torch.no_grad():
            print(llm(inputs_embeds=torch.randn(1, 9, 64, dtype=torch.bfloat16)).logits.shape)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "torch.Size([1, 9, 128])" in done.stdout


def test_the_int4_kernel_choice_is_checked_and_the_cpu_runs_its_own() -> None:
    from vlmforge.modeling.quantized import INT4_KERNELS, _int4_kernel, gemlite_installed

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert {_int4_kernel(k, cpu) for k in INT4_KERNELS} == {"cpu"}
    assert _int4_kernel("tinygemm", cuda) == "tinygemm"
    assert _int4_kernel("auto", cuda) == "tinygemm"  # GemLite is opt-in until measured on a GPU
    with pytest.raises(ValueError, match="int4 kernel 'marlin': choose one of auto, tinygemm, gemlite"):
        _int4_kernel("marlin", cpu)
    if not gemlite_installed():
        with pytest.raises(ValueError, match="needs the gemlite package"):
            _int4_kernel("gemlite", cuda)
    packed, s, z = quantize_int4(torch.randn(16, 64), 32)
    module = Int4Linear(packed, s, z, 32, None, cpu, torch.float32, kernel="gemlite")
    assert module.kernel == "cpu" and "kernel cpu" in repr(module)
    assert lowbit_kernels(torch.nn.Sequential(module)) == {"_weight_int4pack_mm_for_cpu": 1}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kernel", ["tinygemm", "gemlite"])
def test_the_cuda_int4_kernels_compute_the_dequantized_product(kernel: str) -> None:
    """Each CUDA kernel on the same stored codes, batch 1 (the GEMV) and 6 (a GEMM), against the dequantized
    weight; a group of one constant value too (its scale at the 1e-6 floor: zero / scale, GemLite's zero point,
    would overflow float16, so the shift is stored as such)."""
    from vlmforge.modeling.quantized import gemlite_installed

    if kernel == "gemlite" and not gemlite_installed():
        pytest.skip("gemlite is not installed (pip install gemlite)")
    torch.manual_seed(2)
    w, bias = torch.randn(256, 512) * 0.02, torch.randn(256) * 0.1
    w[3, :128] = 0.25  # one constant group
    packed, s, z = quantize_int4(w, 128)
    module = Int4Linear(packed, s, z, 128, bias.half().cuda(), torch.device("cuda"), torch.float16, kernel=kernel)
    assert module.kernel == kernel
    reference = dequantize_int4(packed, s, z, 128).cuda()
    for rows in (1, 6):
        x = torch.randn(rows, 512, device="cuda")
        expected = x @ reference.T + bias.cuda()
        got = module(x.half())
        assert got.dtype == torch.float16 and got.shape == (rows, 256)
        assert (got.float() - expected).abs().max().item() < 0.02 * expected.abs().max().item()
