"""CPU benchmark of quantization: calibration and export time and peak memory, per tiny model and format.

Each case runs ``vlmforge checkpoint``'s stage (:func:`vlmforge.toolchains.quantize.checkpoint.write_checkpoint`:
VLM load, calibration on the family's prefixes, export, read-back verification) in a child process of its own, so
peak RSS is per case; the float checkpoint of the same model, in the same run, is the baseline each case is compared
with. LLaMA-type LLMs write TensorRT-LLM checkpoints; OPT's calibrated formats (which TensorRT-LLM's OPT converter
cannot write) the unified checkpoint.

    python bench/quantize_cpu.py [--calib-size 16] [--models tiny-llava,tiny-blip2-opt] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# (label, method, KV cache, checkpoint kind for LLaMA-type LLMs, for OPT)
FORMATS = [
    ("fp16", "none", "auto", "trtllm", "trtllm"),
    ("int8_wo", "int8_wo", "auto", "trtllm", "trtllm"),
    ("int4_wo", "int4_wo", "auto", "trtllm", "trtllm"),
    ("int4_awq", "int4_awq", "auto", "trtllm", "unified"),
    ("w4a8_awq", "w4a8_awq", "auto", "trtllm", "unified"),
    ("int8_sq", "int8_sq", "auto", "trtllm", "unified"),
    ("fp8", "fp8", "auto", "trtllm", "unified"),
    ("fp8+kv fp8", "fp8", "fp8", "trtllm", "unified"),
    ("int4_awq+kv int8", "int4_awq", "int8", "trtllm", None),
]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_case(model: str, method: str, kv: str, kind: str, calib_size: int, out: Path) -> dict[str, Any]:
    """One case, in this process (the child): import, then the stage, timing each part."""
    start = time.perf_counter()
    import torch  # noqa: F401

    import modelopt.torch.quantization  # noqa: F401
    from vlmforge.families import resolve
    from vlmforge.sources import open_source
    from vlmforge.specs.catalog import load_model_or_spec
    from vlmforge.toolchains.quantize.checkpoint import CheckpointKind, write_checkpoint

    imported = time.perf_counter() - start
    rss_imports = peak_rss_mib()
    spec = load_model_or_spec(model, {"quantization.method": method, "quantization.kv_cache_dtype": kv,
                                      "quantization.group_size": 64, "quantization.calibration.size": calib_size,
                                      "validation.max_logit_error": 100.0})
    open_source(spec.source).fetch(out / "model")
    start = time.perf_counter()
    result = write_checkpoint(resolve(spec), out / "model", out / "ckpt", device="cpu", kind=CheckpointKind(kind))
    total = time.perf_counter() - start
    check = result.verification
    return {
        "import_s": round(imported, 2), "stage_s": round(total, 2), "calibrate_s": result.calibrate_seconds,
        "export_s": result.export_seconds, "bytes": result.bytes, "quant_algo": result.quant_algo,
        "kv_cache_quant_algo": result.kv_cache_quant_algo, "rss_after_imports_mib": round(rss_imports, 1),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "readback_vs_quantized": check.readback_vs_quantized.max_error,
        "next_token_error_vs_fp32": check.readback_vs_reference.next_token_error,
    }


def child(model: str, label: str, calib_size: int) -> dict[str, Any]:
    _, method, kv, llama_kind, opt_kind = next(f for f in FORMATS if f[0] == label)
    kind = opt_kind if "opt" in model else llama_kind
    row: dict[str, Any] = {"model": model, "format": label, "kind": kind}
    if kind is None:
        return row | {"skipped": "no checkpoint kind holds it (OPT: no KV scales in TensorRT-LLM; unified: FP8 KV only)"}
    with tempfile.TemporaryDirectory(prefix="bench-quantize-") as tmp:
        done = subprocess.run([sys.executable, __file__, "--case", model, label, str(calib_size), tmp],
                              capture_output=True, text=True, timeout=1800)
    if done.returncode:
        return row | {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return row | json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny-llava,tiny-blip2-opt")
    parser.add_argument("--calib-size", type=int, default=16, help="calibration samples (batches of 4)")
    parser.add_argument("--formats", default=",".join(f[0] for f in FORMATS))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--case", nargs=4, metavar=("MODEL", "FORMAT", "CALIB", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        model, label, calib, out = args.case
        _, method, kv, llama_kind, opt_kind = next(f for f in FORMATS if f[0] == label)
        kind = opt_kind if "opt" in model else llama_kind
        print(json.dumps(run_case(model, method, kv, kind, int(calib), Path(out))))
        return

    import torch

    rows = []
    for model in args.models.split(","):
        for label in args.formats.split(","):
            row = child(model, label, args.calib_size)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{'model':<16} {'format':<18} {'kind':<8} {'calib s':>8} {'export s':>8} {'stage s':>8} "
          f"{'peak MiB':>9} {'vs fp16':>8} {'bytes':>9} {'readback':>9} {'next-tok':>8}")
    for row in rows:
        if "calibrate_s" not in row:
            print(f"{row['model']:<16} {row['format']:<18} {str(row['kind']):<8} {row.get('skipped') or row.get('error')}")
            continue
        base = next(r for r in rows if r["model"] == row["model"] and r["format"] == "fp16")
        print(f"{row['model']:<16} {row['format']:<18} {row['kind']:<8} {row['calibrate_s']:>8.2f} {row['export_s']:>8.2f} "
              f"{row['stage_s']:>8.2f} {row['peak_rss_mib']:>9.0f} {row['peak_rss_mib'] - base['peak_rss_mib']:>+8.0f} "
              f"{row['bytes']:>9} {row['readback_vs_quantized']:>9.1e} {row['next_token_error_vs_fp32']:>8.3f}")
    machine = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
               "cores": __import__("os").cpu_count(), "calib_size": args.calib_size}
    if args.out:
        args.out.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
