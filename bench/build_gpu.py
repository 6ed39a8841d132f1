"""GPU benchmark: the hf toolchain builds and validates a full-size LLaVA-1.5-7B (random weights, fp16).

Runs the core library only (no Prefect, no store): HfPipeline's stages one by one, with each stage's
wall time and peak GPU memory, then the runner's vision / LLM / end-to-end latency from validation.

    python bench/build_gpu.py --out /tmp/llava7b [--json results.json]

The checkpoint is generated on the GPU with LLaVA-1.5-7B's exact shapes (CLIP ViT-L/14-336 +
LLaMA-7B, vocab 32064) and random weights, since no model hub is reachable from the GPU machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from vlmforge.build.pipeline import HfPipeline
from vlmforge.build.workdir import Workdir
from vlmforge.errors import ValidationFailed
from vlmforge.specs.schema import spec_from_dict

log = logging.getLogger("bench.build_gpu")


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
    from transformers import CLIPImageProcessor, LlavaForConditionalGeneration, LlavaProcessor

    from vlmforge.families.tinykit import make_fast_tokenizer

    start = time.perf_counter()
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlavaForConditionalGeneration._from_config(llava_7b_config(), dtype=torch.float16)
    model.save_pretrained(out)
    del model
    torch.cuda.empty_cache()
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}),
        tokenizer=make_fast_tokenizer(template="bos"), patch_size=14, vision_feature_select_strategy="default",
        image_token="<image>", num_additional_image_tokens=1,
    )
    processor.save_pretrained(out)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/vlmforge-llava7b"))
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    assert torch.cuda.is_available(), "this benchmark needs a GPU"

    checkpoint = args.out / "checkpoint"
    gen_seconds = make_checkpoint(checkpoint) if not (checkpoint / "config.json").exists() else 0.0
    spec = spec_from_dict({
        "name": "llava-1.5-7b-random", "family": "llava", "source": f"file://{checkpoint}", "dtype": "float16",
        "limits": {"max_batch_size": 1, "max_input_len": 2048, "max_output_len": 512},
        "architecture": {"num_visual_features": 576, "num_attention_heads": 32},
        "validation": {"max_new_tokens": 30, "min_token_agreement": 0.5, "max_logit_error": 1.0},
    })
    pipeline = HfPipeline(spec, Workdir(args.out / "work"), device="cuda")
    rows: list[dict[str, Any]] = []

    def stage(name: str, fn: Any, *inputs: Any) -> Any:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        try:
            outcome = fn(*inputs)
        finally:
            torch.cuda.synchronize()
            rows.append({"stage": name, "seconds": round(time.perf_counter() - start, 2),
                         "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)})
            log.info("%s", rows[-1])
        torch.cuda.empty_cache()
        return outcome

    total = time.perf_counter()
    fetched = stage("fetch", pipeline.fetch)
    converted = stage("convert", pipeline.convert, fetched)
    llm = stage("llm", pipeline.build_llm, converted, None)
    visual = stage("visual", pipeline.build_visual, fetched)
    engine = stage("engine", pipeline.assemble, visual, llm)
    validation: dict[str, Any]
    try:
        validation = stage("validate", pipeline.validate, engine, fetched).result
    except ValidationFailed as exc:
        validation = {"failed": str(exc)}
    results = {
        "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "checkpoint_seconds": round(gen_seconds, 1),
        "stages": rows, "total_seconds": round(time.perf_counter() - total, 1),
        "engine_bytes": sum(f.size for f in engine.record.files),
        "validation": {k: v for k, v in validation.items() if k != "inputs"},
    }
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
