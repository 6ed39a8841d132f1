"""Batch-1 matrix-vector products of LLaVA-1.5-7B's linear shapes: fp16 against int8 and int4 weight-only kernels,
each compiled as the runner's decode step is (``max-autotune-no-cudagraphs``, then replayed from a CUDA graph),
all in this run.

What decides a weight-only format's decode speed is whether its kernel reads the low-bit weights at the bandwidth
fp16 reads its own; this prints, per shape and kernel, microseconds per call, the speed-up over fp16 and the
effective bandwidth, and the per-token sum over one decoder layer (x32 for the model):

- ``fp16``: ``F.linear`` on fp16 weights (the baseline);
- ``int8_pack_mm``: torch's ``_weight_int8pack_mm`` (float32 activations on CUDA);
- ``int8_cast``: int8 codes cast inside ``F.linear``, scaled after (vlmforge's CUDA int8 path);
- ``int4_tinygemm``: torch's ``_weight_int4pack_mm`` (bfloat16 activations; vlmforge's CUDA int4 path);
- ``int4_cast``: int4 codes unpacked from bytes, dequantized per group and cast inside ``F.linear`` (a candidate);
- ``int4_gemlite``: vlmforge's ``Int4Linear`` with ``kernel="gemlite"`` (GemLite's Triton GEMV on the same codes),
  where the gemlite package is installed.

    python bench/lowbit_gemv.py [--out bench/results/lowbit_gemv.json]    # a GPU (--tiny: any device, no measurement)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from vlmforge.modeling.quantized import Int4Linear, _inner_k_tiles, gemlite_installed

# (name, in_features, out_features, per layer): LLaVA-1.5-7B's LLaMA-2-7B decoder layer
SHAPES = [("qkvo", 4096, 4096, 4), ("gate_up", 4096, 11008, 2), ("down", 11008, 4096, 1)]  # 11008 = 86 x 128
TINY_SHAPES = [("qkvo", 256, 256, 4), ("gate_up", 256, 768, 2), ("down", 768, 256, 1)]
GROUP = 128


Kernels = dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], int]]


def kernels(k: int, n: int, device: str) -> tuple[Kernels, torch.Tensor]:
    """Each kernel as a function of the activation with the bytes of weights it reads, and the float32 weight."""
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(n, k, generator=gen) * 0.02).to(device)
    w16 = w.half()
    out: Kernels = {
        "fp16": (lambda x: F.linear(x, w16), w16.numel() * 2)}
    scale8 = w.abs().amax(dim=1) / 127
    codes8 = torch.round(w / scale8[:, None]).clamp(-127, 127).to(torch.int8)
    scale8_16 = scale8.half()
    out["int8_pack_mm"] = (lambda x: torch._weight_int8pack_mm(x.float(), codes8, scale8).half(), codes8.numel())
    out["int8_cast"] = (lambda x: F.linear(x, codes8.to(x.dtype)) * scale8_16, codes8.numel())
    # int4: asymmetric in groups along K, codes 0..15, w = (code - 8) * scale + zero
    grouped = w.reshape(n, k // GROUP, GROUP)
    lo, hi = grouped.amin(-1), grouped.amax(-1)
    scale4 = ((hi - lo) / 15).clamp(min=1e-8)
    zero4 = lo + 8 * scale4
    codes4 = torch.round((grouped - lo[..., None]) / scale4[..., None]).clamp(0, 15).to(torch.uint8).reshape(n, k)
    packed = (codes4[:, ::2] << 4 | codes4[:, 1::2]).contiguous()  # [N, K/2], even column in the high nibble
    if device == "cuda":  # tinygemm's layout is made on CUDA only
        tiny = torch.ops.aten._convert_weight_to_int4pack(packed, _inner_k_tiles(k))
        sz = torch.stack([scale4.t(), zero4.t()], dim=-1).to(torch.bfloat16).contiguous()
        out["int4_tinygemm"] = (lambda x: torch.ops.aten._weight_int4pack_mm(x.bfloat16(), tiny, GROUP, sz).half(),
                                packed.numel())
    if device == "cuda" and gemlite_installed():
        try:
            gl = Int4Linear(packed, scale4, zero4, GROUP, None, torch.device(device), torch.float16, kernel="gemlite")
            out["int4_gemlite"] = (gl, packed.numel())
        except Exception as exc:  # noqa: BLE001 - reported; the other kernels are still measured
            print(f"int4_gemlite: {type(exc).__name__}: {exc}", flush=True)
    s16, z16 = scale4.half(), zero4.half()

    def int4_cast(x: torch.Tensor) -> torch.Tensor:
        c = torch.stack([packed >> 4, packed & 0xF], dim=-1).reshape(n, k // GROUP, GROUP).to(x.dtype)
        deq = ((c - 8) * s16[..., None] + z16[..., None]).reshape(n, k)
        return F.linear(x, deq)

    out["int4_cast"] = (int4_cast, packed.numel())
    return out, w


def time_us(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, iters: int) -> float:
    """Microseconds per call. On CUDA the calls are captured in a CUDA graph and replayed, as the runner's decode
    step is: what is left is the kernels' own time, not Python's or the launcher's."""
    for _ in range(5):
        fn(x)
    if x.is_cuda:
        torch.cuda.synchronize()
        per_graph = 20
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(per_graph):
                fn(x)
        graph.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        replays = max(1, iters // per_graph)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) * 1000 / (replays * per_graph)
    import time

    t = time.perf_counter()
    for _ in range(iters):
        fn(x)
    return (time.perf_counter() - t) * 1e6 / iters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    shapes = TINY_SHAPES if args.tiny else SHAPES
    iters = 5 if args.tiny else 1000
    result: dict = {"gpu": torch.cuda.get_device_name() if device == "cuda" else None, "torch": torch.__version__,
                    "shapes": {}}
    layer: dict[str, float] = {}
    for name, k, n, count in shapes:
        x = torch.randn(1, k, device=device).half()
        row: dict = {}
        made, weight = kernels(k, n, device)
        reference = F.linear(x.float(), weight)
        for kernel, (fn, weight_bytes) in made.items():
            if device == "cpu" and kernel == "int8_pack_mm":
                continue  # float32 activations: CUDA's signature
            compiled = torch.compile(fn, mode="max-autotune-no-cudagraphs", dynamic=False) if device == "cuda" else fn
            try:
                us = time_us(compiled, x, iters)
                error = ((compiled(x).float() - reference).norm() / reference.norm()).item()
            except Exception as exc:  # noqa: BLE001 - one kernel's failure must not lose the others' figures
                print(f"{name} {kernel}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                continue
            row[kernel] = {"us": round(us, 2), "weight_bytes": weight_bytes,
                           "gb_s": round(weight_bytes / us / 1e3, 1), "rel_error_vs_fp32": round(error, 5)}
            layer[kernel] = layer.get(kernel, 0.0) + us * count
        base = row["fp16"]["us"]
        for entry in row.values():
            entry["speedup_vs_fp16"] = round(base / entry["us"], 3)
        result["shapes"][f"{name} {k}->{n} x{count}"] = row
        print(name, {k_: (v["us"], v["speedup_vs_fp16"]) for k_, v in row.items()}, flush=True)
    result["per_layer_us"] = {k: round(v, 1) for k, v in layer.items()}
    result["per_layer_speedup_vs_fp16"] = {k: round(layer["fp16"] / v, 3) for k, v in layer.items()}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
