"""Weight-only int8/int4 LLMs that run on torch's own low-bit matmul kernels (the hf runner's int8_wo and int4_wo).

Every ``nn.Linear`` of the LLM but the head becomes an :class:`Int8Linear` (per-output-channel symmetric int8,
``torch._weight_int8pack_mm`` on the CPU, the codes cast inside a fused matmul on CUDA) or an :class:`Int4Linear` (asymmetric int4 in groups along the input,
``torch._weight_int4pack_mm``: tinygemm on CUDA, bf16 activations; its CPU twin ``_weight_int4pack_mm_for_cpu``;
on CUDA, opt-in, GemLite's Triton GEMV/GEMM instead, see :data:`INT4_KERNELS`).
The weights stay low-bit in memory and are read low-bit by the kernel: no fake quantization.

On disk (``save_quantized``): ``config.json``, ``lowbit.json`` (format, bits, group size, the quantized
modules) and ``model.safetensors`` with the float tensors under their own names and, per quantized linear,
``NAME.qweight`` (int8 [N, K], or uint8 [N, K/2] holding two int4 codes per byte, the even input column in the
high nibble, the layout ``_convert_weight_to_int4pack`` takes on CUDA), ``NAME.scale`` (float32: [N] for int8,
[N, K/group] for int4) and, for int4, ``NAME.zero`` ([N, K/group]): ``w = (code - 8) * scale + zero``.
The device's own packed layout is made when the model is loaded (:func:`load_quantized`).
"""

from __future__ import annotations

import copy
import functools
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import torch

logger = logging.getLogger(__name__)

QuantWeights = Literal["int8", "int4"]
Int4Kernel = Literal["auto", "tinygemm", "gemlite"]
INT4_KERNELS: dict[str, str] = {
    "auto": "tinygemm, the kernel measured so far (the CPU always runs torch's CPU kernel); GemLite is opt-in until "
            "its decode rate on a GPU is measured (bench/quantize_gpu.py --engines fp16,int4,int4_gemlite)",
    "tinygemm": "torch's _weight_int4pack_mm (bfloat16 activations); reads int4 at 1.0-1.4 TB/s on an H200",
    "gemlite": "GemLite's Triton kernels (pip install gemlite; Triton >= 3.6): a reverse split-K GEMV at batch 1-4, "
               "split-K and tiled GEMMs above, fp16 activations, the int4 codes repacked into int32 words",
}
"""The CUDA kernels an int4 weight-only linear can run on."""

LOWBIT_FORMAT = "vlmforge-lowbit-1"
WEIGHTS_FILE = "model.safetensors"
META_FILE = "lowbit.json"
INT4_GROUPS = (32, 64, 128, 256)
"""Group sizes the int4 kernels take."""
DEFAULT_EXCLUDE = ("lm_head",)


# --- quantizing tensors (pure, device-independent) ----------------------------------------------


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (codes int8 [N, K], scale float32 [N]), ``w ~= codes * scale``."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    codes = torch.clamp(torch.round(w / scale[:, None]), -128, 127).to(torch.int8)
    return codes, scale


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 in groups of ``group_size`` input columns (min/max per group, as tinygemm takes it):
    (packed uint8 [N, K/2], scale float32 [N, K/g], zero float32 [N, K/g]), ``w ~= (code - 8) * scale + zero``."""
    w = weight.detach().float()
    n, k = w.shape
    groups = w.reshape(n, k // group_size, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = ((high - low) / 15.0).clamp(min=1e-6)
    codes = torch.clamp(torch.round((groups - low[..., None]) / scale[..., None]), 0, 15).to(torch.uint8)
    zero = low + 8.0 * scale
    return pack_int4(codes.reshape(n, k)), scale, zero


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 [N, K] -> [N, K/2]: column 2j in the high nibble, 2j+1 in the low one."""
    codes = codes.to(torch.uint8)
    return (codes[:, ::2] << 4 | codes[:, 1::2]).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`pack_int4`: uint8 [N, K/2] -> int32 codes [N, K]."""
    high = (packed >> 4).to(torch.int32)
    low = (packed & 0x0F).to(torch.int32)
    return torch.stack([high, low], dim=-1).reshape(packed.shape[0], packed.shape[1] * 2)


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """float32 [N, K] from the stored int4 tensors (for checks; serving never does this)."""
    codes = unpack_int4(packed).float()
    return (codes - 8.0) * scale.repeat_interleave(group_size, dim=1) + zero.repeat_interleave(group_size, dim=1)


def int4_fits(in_features: int, out_features: int, group_size: int) -> bool:
    """The int4 kernels' shape rules: K a multiple of the group and of 32 (two 16-wide k-tiles), N of 8."""
    return in_features % group_size == 0 and in_features % 32 == 0 and out_features % 8 == 0


def _inner_k_tiles(in_features: int) -> int:
    return next(tiles for tiles in (8, 4, 2) if in_features % (tiles * 16) == 0)


# --- the modules ---------------------------------------------------------------------------------


class Int8Linear(torch.nn.Module):
    """``y = x @ (codes * scale).T + b``: ``torch._weight_int8pack_mm`` on the CPU; on CUDA the codes are cast in
    the matmul (fused by the compiled decode step). The weights stay int8 in memory."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = codes.shape
        # a fresh copy: safetensors hands out tensors at any byte offset, and torch's CPU bfloat16 kernel
        # crashes (SIGSEGV, torch 2.13) on a weight that is not 64-byte aligned
        self.register_buffer("qweight", codes.clone(memory_format=torch.contiguous_format))
        self.register_buffer("scale", scale.float().contiguous())
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if flat.is_cuda:
            # Not torch's CUDA _weight_int8pack_mm: it reads float32 activations and ran LLaVA-7B's decode at 20 tok/s
            # on an H200 (fp16: 236; bench/quantize_gpu.py). The int8 codes cast in the matmul's operand, scaled after
            # (exact: |code| <= 127): the compiled decode step fuses the cast into the matrix-vector product, so the
            # weights are still read as int8.
            out = torch.nn.functional.linear(flat, self.qweight.to(flat.dtype)) * self.scale.to(flat.dtype)
        else:
            out = torch._weight_int8pack_mm(flat.contiguous(), self.qweight, self.scale.to(x.dtype))
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per channel"


class Int4Linear(torch.nn.Module):
    """``y = x @ W.T + b`` with W int4 in groups. On the CPU ``torch._weight_int4pack_mm_for_cpu``; on CUDA one of
    :data:`INT4_KERNELS` (``kernel``): torch's tinygemm (bfloat16 activations) or GemLite's Triton kernels. Casting
    unpacked codes inside a compiled matmul, as int8 does, is 3.7x slower per layer than tinygemm on an H200
    (bench/lowbit_gemv.py): Inductor does not fuse the unpacking."""

    def __init__(self, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None, device: torch.device, dtype: torch.dtype, kernel: Int4Kernel = "auto"
                 ) -> None:
        super().__init__()
        self.out_features = packed.shape[0]
        self.in_features = packed.shape[1] * 2
        self.group_size = group_size
        self.kernel = _int4_kernel(kernel, device)
        self.cuda_kernel = device.type == "cuda"
        self.register_buffer("bias", bias)
        if self.kernel == "gemlite":
            self.gemlite = _gemlite_linear(packed, scale, zero, group_size, bias, device, dtype)
            return
        tiles = _inner_k_tiles(self.in_features)
        if self.cuda_kernel:
            kernel_weight = torch.ops.aten._convert_weight_to_int4pack(packed.to(device).contiguous(), tiles)
            dtype = torch.bfloat16
        else:
            kernel_weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_int4(packed).to(device), tiles)
        # [K/g, N, 2]: per group and output channel, (scale, zero)
        scales_and_zeros = torch.stack([scale.t(), zero.t()], dim=-1).to(device, dtype).contiguous()
        self.register_buffer("kernel_weight", kernel_weight)
        self.register_buffer("scales_and_zeros", scales_and_zeros)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "gemlite":  # bias inside
            return self.gemlite(x)
        flat = x.reshape(-1, self.in_features)
        if self.cuda_kernel:
            out = torch.ops.aten._weight_int4pack_mm(flat.to(torch.bfloat16).contiguous(), self.kernel_weight,
                                                     self.group_size, self.scales_and_zeros).to(x.dtype)
        else:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat.contiguous(), self.kernel_weight, self.group_size,
                                                             self.scales_and_zeros.to(x.dtype))
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int4 groups of {self.group_size}, "
                f"kernel {self.kernel}")


def gemlite_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("gemlite") is not None


def _int4_kernel(kernel: str, device: torch.device) -> str:
    """The kernel an int4 linear on ``device`` runs: ``cpu`` off CUDA, else ``kernel`` with ``auto`` resolved."""
    if kernel not in INT4_KERNELS:
        raise ValueError(f"int4 kernel {kernel!r}: choose one of {', '.join(INT4_KERNELS)}")
    if device.type != "cuda":
        return "cpu"
    if kernel == "auto":
        return "tinygemm"
    if kernel == "gemlite" and not gemlite_installed():
        raise ValueError("int4 kernel 'gemlite' needs the gemlite package (pip install gemlite, with Triton >= 3.6); "
                         "or choose 'tinygemm' (torch's own)")
    return kernel


def _gemlite_linear(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                    bias: torch.Tensor | None, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A GemLite A16W4 linear holding the same codes: ``w = (code - 8) * scale + zero = code * scale + (zero -
    8 * scale)``, which is GemLite's fused multiply-add form (``W_group_mode`` 4: ``Wq * scales + zeros``)."""
    import gemlite  # noqa: F401 - imported on a CUDA device only: importing it reads the GPU's name
    from gemlite.core import DType, GemLiteLinearTriton

    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"the gemlite int4 kernel takes float16 or bfloat16 activations, not {dtype}")
    _gemlite_configs()
    n, k = packed.shape[0], packed.shape[1] * 2
    kind = DType.FP16 if dtype == torch.float16 else DType.BF16
    layer = GemLiteLinearTriton(W_nbits=4, group_size=group_size, in_features=k, out_features=n, input_dtype=kind,
                                output_dtype=kind)
    scale = scale.to(device, torch.float32)
    shift = zero.to(device, torch.float32) - 8.0 * scale
    codes = unpack_int4(packed.to(device)).to(torch.uint8)
    # pack() keeps its zeros in the fma form (-zeros * scales): given zeros of 0, then set to the shift itself, which
    # stays exact where a group's scale is 0 (a constant group: zero / scale has no value)
    layer.pack(codes, scale.to(dtype), torch.zeros_like(scale, dtype=dtype),
               bias.to(device, dtype) if bias is not None else None)
    with torch.no_grad():
        layer.zeros.copy_(shift.to(dtype).view(n, -1).t())
    return layer


@functools.cache  # once per process, not once per linear (a 7B LLM has 224)
def _gemlite_configs() -> None:
    """GemLite ships tuned kernel configurations per GPU and loads the one whose tag is in the device's name; an H200
    (the H100's SM 9.0 and shapes) gets the H100's, else every shape is autotuned at its first call."""
    from pathlib import Path as _Path

    import gemlite
    from gemlite.core import GemLiteLinearTriton

    name = torch.cuda.get_device_name().lower()
    if "h200" in name:
        GemLiteLinearTriton.load_config(str(_Path(gemlite.__file__).parent / "configs" / "h100.json"),
                                        print_error=False)


def _linears(model: torch.nn.Module, exclude: tuple[str, ...]) -> Iterator[tuple[str, torch.nn.Linear]]:
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not any(name == e or name.endswith("." + e) for e in exclude):
            yield name, module


def _set_module(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


# --- save and load ---------------------------------------------------------------------------------


def quantize_and_save(llm: torch.nn.Module, out_dir: Path, weights: QuantWeights, *, group_size: int = 128,
                      dtype: torch.dtype | None = None, exclude: tuple[str, ...] = DEFAULT_EXCLUDE) -> dict[str, object]:
    """Quantize every linear of ``llm`` but ``exclude`` (the head) and write the lowbit directory; ``llm`` is left
    as it was. The float tensors (embeddings, norms, head, biases) are stored in ``dtype`` (default: as they are);
    int4 layers whose shape the kernel cannot take stay in float (listed in lowbit.json). Returns lowbit.json's
    content."""
    from safetensors.torch import save_file

    if weights not in ("int8", "int4"):
        raise ValueError(f"unknown weight format {weights!r}: int8 or int4")
    if weights == "int4" and group_size not in INT4_GROUPS:
        raise ValueError(f"int4 group size {group_size} is not one the kernels take: {INT4_GROUPS}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    targets = dict(_linears(llm, exclude))
    tensors: dict[str, torch.Tensor] = {}
    quantized, skipped = [], []
    for name, linear in targets.items():
        weight = linear.weight
        if weights == "int4" and not int4_fits(linear.in_features, linear.out_features, group_size):
            skipped.append(name)
            continue
        if weights == "int8":
            codes, scale = quantize_int8(weight)
            tensors.update({f"{name}.qweight": codes, f"{name}.scale": scale})
        else:
            packed, scale, zero = quantize_int4(weight, group_size)
            tensors.update({f"{name}.qweight": packed, f"{name}.scale": scale, f"{name}.zero": zero})
        if linear.bias is not None:
            tensors[f"{name}.bias"] = linear.bias.detach()
        quantized.append(name)
    done = {f"{name}.{p}" for name in quantized for p in ("weight", "bias")}
    seen: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for key, value in llm.state_dict().items():
        if key in done:
            continue
        if value.numel() and value.data_ptr() in seen:  # tied (embed_tokens / lm_head): stored once
            aliases[key] = seen[value.data_ptr()]
            continue
        seen[value.data_ptr()] = key
        tensors[key] = value.detach()
    codes = {f"{name}.{part}" for name in quantized for part in ("qweight", "scale", "zero")}
    if dtype is not None:
        tensors = {k: v.to(dtype) if k not in codes and v.is_floating_point() else v for k, v in tensors.items()}
    save_file({k: v.to("cpu").contiguous() for k, v in tensors.items()}, str(out_dir / WEIGHTS_FILE),
              metadata={"format": "pt"})
    config = copy.deepcopy(llm.config)  # type: ignore[attr-defined]
    if dtype is not None:
        config.dtype = dtype
    config.save_pretrained(out_dir)
    meta: dict[str, object] = {"format": LOWBIT_FORMAT, "weights": weights, "group_size": group_size if weights == "int4" else None,
                               "quantized": quantized, "kept_float": skipped, "aliases": aliases}
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=1))
    if skipped:
        logger.warning("int4: %d linear layers have shapes the kernel cannot take and stay in float: %s", len(skipped),
                       ", ".join(skipped[:5]))
    return meta


def read_meta(out_dir: Path) -> dict[str, object]:
    path = Path(out_dir) / META_FILE
    meta = json.loads(path.read_text())
    if meta.get("format") != LOWBIT_FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r}, expected {LOWBIT_FORMAT}")
    return meta


def load_quantized(model_cls: type, out_dir: Path, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu", int4_kernel: Int4Kernel = "auto") -> torch.nn.Module:
    """A ``model_cls`` LLM from a :func:`quantize_and_save` directory, on ``device``, its linears on the kernels
    (int4 on CUDA: ``int4_kernel``, one of :data:`INT4_KERNELS`)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from vlmforge.modeling.devices import model_from_config

    out_dir = Path(out_dir)
    meta = read_meta(out_dir)
    device = torch.device(device)
    config = AutoConfig.from_pretrained(out_dir)
    with torch.device(device):
        model = model_from_config(model_cls, config, dtype)
    state = load_file(str(out_dir / WEIGHTS_FILE), device=str(device))
    for name in meta["quantized"]:  # type: ignore[union-attr]
        bias = state.pop(f"{name}.bias", None)
        bias = bias.to(dtype) if bias is not None else None
        if meta["weights"] == "int8":
            module: torch.nn.Module = Int8Linear(state.pop(f"{name}.qweight"), state.pop(f"{name}.scale"), bias)
        else:
            module = Int4Linear(state.pop(f"{name}.qweight"), state.pop(f"{name}.scale"), state.pop(f"{name}.zero"),
                                int(meta["group_size"]), bias, device, dtype, int4_kernel)  # type: ignore[arg-type]
        _set_module(model, name, module)
    for alias, source in meta.get("aliases", {}).items():  # type: ignore[union-attr]
        state[alias] = state[source]
    missing, unexpected = model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()},
                                                strict=False)
    lowbit = {n for n, m in model.named_modules() if isinstance(m, (Int8Linear, Int4Linear))}
    # a low-bit linear's own tensors (its kernel's layout, a GemLite layer's) are made from the codes, not loaded
    missing = [k for k in missing if not any(k.startswith(f"{name}.") for name in lowbit)]
    if missing or unexpected:
        raise ValueError(f"{out_dir}: the weights do not fit {model_cls.__name__}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    model.tie_weights()
    return model.eval()


def lowbit_kernels(model: torch.nn.Module) -> dict[str, int]:
    """How many linears run on which kernel (for logs and benchmarks)."""
    counts: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, Int8Linear):
            key = "int8_cast_in_linear" if module.qweight.is_cuda else "_weight_int8pack_mm"
        elif isinstance(module, Int4Linear):
            key = {"tinygemm": "_weight_int4pack_mm", "gemlite": "gemlite",
                   "cpu": "_weight_int4pack_mm_for_cpu"}[module.kernel]
        elif isinstance(module, torch.nn.Linear):
            key = "float"
        else:
            continue
        counts[key] = counts.get(key, 0) + 1
    return counts
