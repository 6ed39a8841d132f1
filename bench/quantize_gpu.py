"""GPU benchmark of quantization on LLaVA-1.5-7B shapes (random fp16 weights): two parts, each under 10 minutes.

``--parts decode`` (needs vlmforge's core only: pydantic, see bench/README.md): the hf runner's LLM engines at batch 1
on the static-cache, compiled and graph-captured decode path: fp16 against int4 and int8 weight-only (vlmforge's
low-bit format; int4 on torch's ``_weight_int4pack_mm``, int8 codes cast inside the compiled matmul), all in this
run: decode
tokens/s, the speed-up over fp16 (target: 1.8x for int4), the weight bytes each reads per token, and, teacher-forced
on fp16's greedy tokens, the logit error and the greedy agreement against fp16.

``--parts checkpoint`` (needs NVIDIA ModelOpt too: bench/wheels-modelopt.txt): ``vlmforge checkpoint``'s stage per
format on the full VLM (saved to disk first): calibration time (AWQ on the real spliced LLaVA prefixes), export time,
peak GPU memory, the TensorRT-LLM checkpoint's size, and its read-back against the quantized model.

    python bench/quantize_gpu.py --parts decode --out bench/results/quantize_gpu_decode.json
    python bench/quantize_gpu.py --parts checkpoint --formats int4_awq,none --out bench/results/quantize_gpu_ckpt.json
    python bench/quantize_gpu.py --tiny          # a smoke test of both parts on any device (not a measurement)
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from runner_gpu import agreement, build, host_cpu, llava_config  # noqa: E402 - bench/, beside this script

from vlmforge.modeling.generation import teacher_forced_logits  # noqa: E402
from vlmforge.modeling.quantized import load_quantized, lowbit_kernels, quantize_and_save  # noqa: E402
from vlmforge.runner.batching import GreedyBatch  # noqa: E402

log = logging.getLogger("bench")


def decode_rate(llm: Any, prefix: Any, new_tokens: int, device: str, repeats: int) -> tuple[float, list[int]]:
    """Median decode tokens/s at batch 1 (first token to last, from the runner's own token events) and the tokens."""
    from vlmforge.runner.static import StaticDecoder

    limit = prefix.length + new_tokens + 8  # the static-cache path everywhere; compiled and captured on a GPU
    factory = StaticDecoder(llm, max_batch_size=1, max_length=limit, compile=device.startswith("cuda")).batch

    def one() -> tuple[float, list[int]]:
        batch = GreedyBatch(llm, [prefix], [new_tokens], factory=factory)
        stamps = [time.perf_counter() for _ in batch]
        return (new_tokens - 1) / (stamps[-1] - stamps[0]), batch.tokens[0]

    one()  # compile and capture
    runs = [one() for _ in range(repeats)]
    return sorted(r[0] for r in runs)[len(runs) // 2], runs[-1][1]


ENGINES = {"fp16": "the float16 LLM", "int4": "int4 weight-only on torch's tinygemm (_weight_int4pack_mm)",
           "int4_gemlite": "int4 weight-only on GemLite's Triton kernels (the same codes)",
           "int8": "int8 weight-only, the codes cast inside the compiled matmul"}


def part_decode(tiny: bool, device: str, new_tokens: int, repeats: int, group_size: int, work: Path,
                names: list[str]) -> dict[str, Any]:
    from vlmforge.toolchains.hf.saving import safetensors_size

    bench = build(tiny, device, torch.float16)
    prefix = bench.prefix(0)
    results: dict[str, Any] = {}
    engines: dict[str, Any] = {"fp16": bench.llm}
    bytes_read = {"fp16": sum(p.numel() * p.element_size() for p in bench.llm.parameters())}
    for name in names[1:]:
        weights = name.split("_")[0]
        target = work / weights
        start = time.perf_counter()
        if not target.exists():
            quantize_and_save(bench.llm, target, weights, group_size=group_size, dtype=torch.float16)  # type: ignore[arg-type]
        kernel = "gemlite" if name == "int4_gemlite" else "tinygemm"
        try:
            engines[name] = load_quantized(type(bench.llm), target, torch.float16, device, int4_kernel=kernel)
        except Exception as exc:  # noqa: BLE001 - reported, the other engines are still measured
            results[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            log.exception("%s failed to load", name)
            continue
        results[f"{name}_quantize_s"] = round(time.perf_counter() - start, 1)
        bytes_read[name] = safetensors_size(target)
    tokens: dict[str, list[int]] = {}
    for name, llm in engines.items():
        results[name] = {"weight_bytes": bytes_read[name],
                         "kernels": lowbit_kernels(llm) if name != "fp16" else {"float": "all"}}
        try:  # one engine's failure (a kernel this torch lacks) must not lose the others' figures
            rate, tokens[name] = decode_rate(llm, prefix, new_tokens, device, repeats)
        except Exception as exc:  # noqa: BLE001 - reported, the run goes on
            results[name]["error"] = f"{type(exc).__name__}: {exc}"[:500]
            log.exception("%s failed", name)
            continue
        results[name]["decode_tok_s"] = round(rate, 2)
        log.info("%s: %.1f tok/s", name, rate)
    reference = teacher_forced_logits(engines["fp16"], prefix.embeds, prefix.mask, tokens["fp16"])
    for name in names[1:]:
        if name not in tokens:
            continue
        logits = teacher_forced_logits(engines[name], prefix.embeds, prefix.mask, tokens["fp16"])
        error = (logits - reference).abs()
        results[name] |= {
            "speedup_vs_fp16": round(results[name]["decode_tok_s"] / results["fp16"]["decode_tok_s"], 3),
            "teacher_forced_max_logit_error": round(error.max().item(), 4),
            "teacher_forced_mean_logit_error": round(error.mean().item(), 5),
            "teacher_forced_greedy_agreement": round((logits.argmax(-1) == reference.argmax(-1)).float().mean().item(), 4),
            "free_running_agreement": agreement(tokens[name], tokens["fp16"]),
            "logit_scale": round(reference.abs().max().item(), 3),
        }
    results["prefix_length"] = prefix.length
    results["new_tokens"] = new_tokens
    return results


def save_vlm(tiny: bool, out: Path) -> None:
    """The random-weight LLaVA (fp16) with a processor, as a checkpoint folder vlmforge checkpoint takes."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    from runner_gpu import make_model
    from vlmforge.families.tinykit import make_fast_tokenizer

    config = llava_config(tiny)
    model = make_model(tiny, "cpu" if tiny else "cuda", torch.float16)
    model.save_pretrained(out)
    size = config.vision_config.image_size
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
        tokenizer=make_fast_tokenizer(vocab_size=config.text_config.vocab_size), patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy="default", image_token="<image>", num_additional_image_tokens=1)
    processor.save_pretrained(out)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def part_checkpoint(tiny: bool, device: str, formats: list[str], calib_size: int, group_size: int,
                    work: Path) -> dict[str, Any]:
    from vlmforge.families import resolve
    from vlmforge.specs.schema import spec_from_dict
    from vlmforge.toolchains.quantize.checkpoint import write_checkpoint

    model_dir = work / "llava"
    start = time.perf_counter()
    save_vlm(tiny, model_dir)
    results: dict[str, Any] = {"save_vlm_s": round(time.perf_counter() - start, 1)}
    nvf = llava_config(tiny).image_seq_length
    for method in formats:
        spec = spec_from_dict({
            "name": "llava-7b-shapes", "family": "llava", "source": f"file://{model_dir}", "dtype": "float16",
            "architecture": {"num_visual_features": nvf},
            "quantization": {"method": method, "group_size": group_size,
                             "calibration": {"size": calib_size, "batch_size": 4}},
            "validation": {"max_logit_error": 1e9},  # random weights: measured, not gated
        })
        out = work / f"ckpt-{method}"
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        result = write_checkpoint(resolve(spec), model_dir, out, device=device)
        check = result.verification
        results[method] = {
            "stage_s": round(time.perf_counter() - start, 1), "calibrate_s": result.calibrate_seconds,
            "export_s": result.export_seconds, "checkpoint_bytes": result.bytes, "quant_algo": result.quant_algo,
            "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20) if device.startswith("cuda") else None,
            "readback_vs_quantized": check.readback_vs_quantized.max_error,
            "readback_vs_fp32_next_token": check.readback_vs_reference.next_token_error,
            "logit_scale": check.readback_vs_reference.scale,
        }
        log.info("%s: %s", method, results[method])
        shutil.rmtree(out, ignore_errors=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="small shapes on any device: a smoke test")
    parser.add_argument("--parts", default="decode,checkpoint")
    parser.add_argument("--engines", default="fp16,int4,int8", help="decode part: engines, fp16 first, of "
                        + ", ".join(f"{k} ({v})" for k, v in ENGINES.items()))
    parser.add_argument("--formats", default="int4_awq,none", help="checkpoint part: quantization methods")
    parser.add_argument("--calib-size", type=int, default=8, help="checkpoint part: calibration samples (batches of 4)")
    parser.add_argument("--group-size", type=int, default=None, help="int4 group (default 128; 64 with --tiny)")
    parser.add_argument("--new-tokens", type=int, default=None, help="decode part (default 128; 16 with --tiny)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None, help="room for the checkpoints (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.tiny:
        parser.error("full LLaVA-7B shapes need a GPU: run with --tiny on the CPU")
    group = args.group_size or (64 if args.tiny else 128)
    engines = args.engines.split(",")
    if engines[0] != "fp16" or set(engines) - set(ENGINES):
        parser.error(f"--engines {args.engines!r}: fp16 first, then any of {', '.join(ENGINES)}")
    new_tokens = args.new_tokens or (16 if args.tiny else 128)
    report: dict[str, Any] = {
        "machine": {"gpu": torch.cuda.get_device_name(0) if device == "cuda" else None, "cpu": host_cpu(),
                    "torch": torch.__version__, "python": platform.python_version()},
        "shapes": "tiny" if args.tiny else "llava-1.5-7b", "group_size": group,
    }
    with tempfile.TemporaryDirectory(prefix="bench-quantize-", dir=args.workdir) as tmp:
        work = Path(tmp)
        for part in args.parts.split(","):
            if part == "decode":
                report["decode"] = part_decode(args.tiny, device, new_tokens, args.repeats, group, work, engines)
            elif part == "checkpoint":
                try:
                    import modelopt  # noqa: F401
                except ImportError:
                    report["checkpoint"] = {"skipped": "NVIDIA ModelOpt is not installed (bench/wheels-modelopt.txt)"}
                    continue
                report["checkpoint"] = part_checkpoint(args.tiny, device, args.formats.split(","), args.calib_size,
                                                       group, work)
            else:
                parser.error(f"unknown part {part!r}: decode, checkpoint")
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
