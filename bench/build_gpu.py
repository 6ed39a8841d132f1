"""GPU benchmark: the hf toolchain builds and validates a full-size LLaVA-1.5-7B (random weights, fp16).

Runs the core library only (no Prefect, no store): HfPipeline's stages as ``HfPipeline.run(overlap=True)`` and the
build flow run them: fetch, then the visual stage (ONNX export, on the CPU) in a thread beside convert and the LLM
stage (on the GPU), then assemble and validate, from an empty work dir. It prints each stage's wall time (start and
end from the run's start, so the overlap shows), the bytes the build's shared digests hashed and reused, the bytes
the visual stage's tensor digest read, the peak GPU memory, and validation's figures.

    python bench/build_gpu.py --out /tmp/llava7b [--json results.json] [--sequential]
    python bench/build_gpu.py --tiny     # tiny LLaVA shapes on the CPU: a smoke test of this script, anywhere

``--sequential`` runs the stages one after another (the overlap's own gain, and per-stage peak GPU memory).
The checkpoint is generated on the GPU with LLaVA-1.5-7B's exact shapes (CLIP ViT-L/14-336 + LLaMA-7B, vocab
32064) and random weights, since no model hub is reachable from the GPU machine; it is kept in OUT/checkpoint
and reused by later runs (so a run of main's version of this script, before, and this one, after, build the same
bytes). The work dir, OUT/work-build-gpu, is emptied first.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import torch

from vlmforge.build.pipeline import HfPipeline
from vlmforge.build.weights import tensor_index
from vlmforge.build.workdir import Workdir
from vlmforge.errors import ValidationFailed
from vlmforge.specs.schema import spec_from_dict

log = logging.getLogger("bench.build_gpu")
STAGES = ("fetch", "convert", "build_llm", "build_visual", "assemble", "validate")


def llava_7b_config() -> Any:
    """llava-hf/llava-1.5-7b-hf's architecture."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=4, image_seq_length=576,
                       vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
                       tie_word_embeddings=False)


def make_checkpoint(out: Path) -> float:
    """Random-weight LLaVA-1.5-7B in fp16 with a locally built tokenizer and 336px processor."""
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    from vlmforge.families.tinykit import make_fast_tokenizer, pil_image_processor

    start = time.perf_counter()
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlavaForConditionalGeneration._from_config(llava_7b_config(), dtype=torch.float16)
    model.save_pretrained(out)
    del model
    torch.cuda.empty_cache()
    processor = LlavaProcessor(
        image_processor=pil_image_processor("CLIPImageProcessor", size={"shortest_edge": 336},
                                            crop_size={"height": 336, "width": 336}),
        tokenizer=make_fast_tokenizer(template="bos"), patch_size=14, vision_feature_select_strategy="default",
        image_token="<image>", num_additional_image_tokens=1,
    )
    processor.save_pretrained(out)
    return time.perf_counter() - start


def full_spec(checkpoint: Path) -> dict[str, Any]:
    return {
        "name": "llava-1.5-7b-random", "family": "llava", "source": f"file://{checkpoint}", "dtype": "float16",
        "limits": {"max_batch_size": 1, "max_input_len": 2048, "max_output_len": 512},
        "architecture": {"num_visual_features": 576, "num_attention_heads": 32},
        "validation": {"max_new_tokens": 30, "min_token_agreement": 0.5, "max_logit_error": 1.0},
    }


def tiny_spec(checkpoint: Path) -> dict[str, Any]:
    """The catalog's tiny-llava, read from a local directory (a file:// source, as the full run's)."""
    return {
        "name": "tiny-llava-local", "family": "llava", "source": f"file://{checkpoint}", "dtype": "float16",
        "limits": {"max_batch_size": 4, "max_input_len": 128, "max_output_len": 32},
        "architecture": {"num_visual_features": 16, "num_attention_heads": 4},
        "validation": {"max_new_tokens": 16, "min_token_agreement": 0.8, "max_logit_error": 0.05},
    }


class StageClock:
    """Each stage's start and end (seconds from the run's start) and, run one at a time, its digest bytes and peak
    GPU memory; wraps the pipeline's stage methods, from whichever thread runs them."""

    def __init__(self, pipeline: HfPipeline, cuda: bool, sequential: bool) -> None:
        self.pipeline, self.cuda, self.sequential = pipeline, cuda, sequential
        self.rows: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.start = time.perf_counter()
        for name in STAGES:
            setattr(pipeline, name, self.wrap(name, getattr(pipeline, name)))

    def wrap(self, name: str, method: Any) -> Any:
        digests = self.pipeline.workdir.digests

        def timed(*args: Any) -> Any:
            if self.cuda and self.sequential:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            hashed, reused = digests.hashed_bytes, digests.reused_bytes
            began = time.perf_counter()
            try:
                return method(*args)
            finally:
                if self.cuda:
                    torch.cuda.synchronize()
                ended = time.perf_counter()
                row: dict[str, Any] = {"stage": name, "start": round(began - self.start, 2),
                                       "end": round(ended - self.start, 2), "seconds": round(ended - began, 2)}
                if self.sequential:  # overlapped stages share the counters and the GPU's peak
                    row |= {"hashed_bytes": digests.hashed_bytes - hashed,
                            "reused_bytes": digests.reused_bytes - reused}
                    if self.cuda:
                        row["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                with self.lock:
                    self.rows.append(row)
                log.info("%s", row)

        return timed


def human(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024  # type: ignore[assignment]
    return f"{size} B"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/vlmforge-llava7b"))
    parser.add_argument("--json", type=Path, help="write the results here too")
    parser.add_argument("--sequential", action="store_true", help="stages one after another, no overlap")
    parser.add_argument("--tiny", action="store_true", help="tiny LLaVA on the CPU (a smoke test of this script)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cuda = not args.tiny
    if cuda:
        assert torch.cuda.is_available(), "this benchmark needs a GPU (--tiny runs anywhere)"

    out = args.out if not args.tiny or args.out != parser.get_default("out") else Path("/tmp/vlmforge-llava-tiny")
    checkpoint = out / "checkpoint"
    gen_seconds = 0.0
    if not (checkpoint / "config.json").exists():
        if args.tiny:
            from vlmforge.families import get_family

            get_family("llava").make_tiny(checkpoint)
        else:
            gen_seconds = make_checkpoint(checkpoint)
    work = out / "work-build-gpu"
    shutil.rmtree(work, ignore_errors=True)
    spec = spec_from_dict(tiny_spec(checkpoint) if args.tiny else full_spec(checkpoint))
    pipeline = HfPipeline(spec, Workdir(work), device="cuda" if cuda else "cpu")
    clock = StageClock(pipeline, cuda, args.sequential)
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    total = time.perf_counter()
    validation: dict[str, Any]
    try:
        fetched, engine, validated = pipeline.run(overlap=not args.sequential)
        validation = validated.result
    except ValidationFailed as exc:
        validation, engine = {"failed": str(exc)}, None
    seconds = time.perf_counter() - total

    digests = pipeline.workdir.digests
    prefixes = pipeline.resolved.family.visual_weight_prefixes
    visual_bytes = sum(t.end - t.start for t in tensor_index(checkpoint).values() if t.name.startswith(prefixes))
    checkpoint_bytes = sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file())
    results = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
        "mode": "sequential" if args.sequential else "overlap", "checkpoint_seconds": round(gen_seconds, 1),
        "checkpoint_bytes": checkpoint_bytes,
        "checkpoint_files": sorted(p.name for p in checkpoint.glob("*.safetensors")),
        "stages": sorted(clock.rows, key=lambda row: row["start"]), "total_seconds": round(seconds, 1),
        "hashed_bytes": digests.hashed_bytes, "reused_digest_bytes": digests.reused_bytes,
        "visual_tensor_digest_bytes": visual_bytes,
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "engine_bytes": sum(f.size for f in engine.record.files) if engine is not None else None,
        "validation": {k: v for k, v in validation.items() if k != "inputs"},
    }
    print(json.dumps(results, indent=2))
    print(f"\n{'stage':14} {'start s':>8} {'end s':>8} {'wall s':>8}" + ("   hashed    reused" if args.sequential else ""))
    for row in results["stages"]:
        print(f"{row['stage']:14} {row['start']:8.2f} {row['end']:8.2f} {row['seconds']:8.2f}"
              + (f" {human(row['hashed_bytes']):>8} {human(row['reused_bytes']):>9}" if args.sequential else ""))
    print(f"total {results['total_seconds']} s ({results['mode']}); file digests: {human(digests.hashed_bytes)} read and "
          f"hashed, {human(digests.reused_bytes)} reused; the visual stage's tensor digest read {human(visual_bytes)}; "
          f"checkpoint {human(checkpoint_bytes)} in {len(results['checkpoint_files'])} safetensors file(s)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
