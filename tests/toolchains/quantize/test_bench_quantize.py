"""The quantization benchmarks' own smoke runs (CPU): bench/quantize_gpu.py --tiny (both parts: the low-bit engines
on the static-cache decode path against fp16, teacher-forced; vlmforge checkpoint's stage on a saved VLM) and one case
of bench/quantize_cpu.py. The figures in docs/benchmarks.md come from the same scripts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_the_gpu_benchmark_runs_tiny(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "quantize_gpu.py"), "--tiny", "--repeats", "1",
                    "--out", str(out)], check=True, cwd=ROOT, timeout=600, capture_output=True)
    result = json.loads(out.read_text())
    decode = result["decode"]
    assert decode["int4"]["kernels"] == {"_weight_int4pack_mm_for_cpu": 14, "float": 1}
    assert decode["int8"]["kernels"] == {"_weight_int8pack_mm": 14, "float": 1}
    assert decode["int4"]["weight_bytes"] < decode["int8"]["weight_bytes"] < decode["fp16"]["weight_bytes"]
    assert decode["int8"]["teacher_forced_greedy_agreement"] >= 0.8  # int8 barely moves the random LLM's logits
    assert decode["int4"]["teacher_forced_max_logit_error"] > decode["int8"]["teacher_forced_max_logit_error"]
    checkpoint = result["checkpoint"]
    assert checkpoint["int4_awq"]["quant_algo"] == "W4A16_AWQ" and checkpoint["none"]["quant_algo"] is None
    assert checkpoint["int4_awq"]["checkpoint_bytes"] < checkpoint["none"]["checkpoint_bytes"]
    assert checkpoint["int4_awq"]["readback_vs_quantized"] <= 0.01 * checkpoint["int4_awq"]["logit_scale"]


def test_the_cpu_benchmark_runs_one_case(tmp_path: Path) -> None:
    out = tmp_path / "cpu.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "quantize_cpu.py"), "--models", "tiny-blip2-opt",
                    "--formats", "fp16,int8_wo", "--out", str(out)], check=True, cwd=ROOT, timeout=600,
                   capture_output=True)
    rows = json.loads(out.read_text())["rows"]
    assert [(r["format"], r["quant_algo"]) for r in rows] == [("fp16", None), ("int8_wo", "W8A16")]
    assert all(r["peak_rss_mib"] > r["rss_after_imports_mib"] > 0 for r in rows)
