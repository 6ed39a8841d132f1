"""Where a batch-1 decode step of LLaMA-7B (random fp16 weights) spends its time on the GPU.

A diagnostic beside ``runner_gpu.py``: the runner's static decode step (``vlmforge.runner.static``) timed
three ways in one run - through the runner's greedy loop (what a request sees), replayed back to back
without reading tokens (the GPU's own pace), and under ``torch.profiler`` (kernel time per step, the
slowest kernels) - next to the weight-read roofline at the measured copy bandwidth.

    python bench/decode_probe.py [--steps 128] [--prompt 600] [--variant default]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from vlmforge.modeling.generation import LlmPrefix
from vlmforge.runner.batching import GreedyBatch
from vlmforge.runner.static import StaticDecoder

log = logging.getLogger("probe")


def make_llm(tiny: bool) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    if tiny:
        config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024)
    else:
        config = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                             rms_norm_eps=1e-5)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float16)
    with torch.device("cuda"):
        llm = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    llm.generation_config.eos_token_id = None
    return llm.eval()


def copy_bandwidth(device: str = "cuda", gib: float = 2.0) -> float | None:
    """Device-to-device copy bandwidth (bytes read + written per second): what decode can hope for."""
    if not device.startswith("cuda"):
        return None
    n = int(gib * 2**30) // 2
    src = torch.empty(n, dtype=torch.float16, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    torch.cuda.synchronize()
    return 2 * src.numel() * 2 * 10 / (time.perf_counter() - start)


def profile_steps(static: StaticDecoder, prefix: LlmPrefix, max_new_tokens: int, steps: int = 20) -> dict:
    """GPU kernel time per decode step over ``steps`` steps of a fresh batch, and the costliest kernels."""
    from torch.profiler import ProfilerActivity, profile

    batch = static.batch([prefix], max_new_tokens)
    token = batch.prefill().argmax(-1)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        started = time.perf_counter()
        for _ in range(steps):
            token = batch.step(token).argmax(-1)
        torch.cuda.synchronize()
        wall = time.perf_counter() - started
    events = prof.key_averages()
    kernel_us = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA")
    return {"gpu_kernel_ms_per_step": kernel_us / steps / 1000, "profiled_wall_ms_per_step": wall / steps * 1000,
            "top_kernels": [(e.key[:100], e.count, round(e.self_device_time_total / steps, 1))
                            for e in sorted(events, key=lambda e: -e.self_device_time_total)[:25]],
            "table": events.table(sort_by="self_device_time_total", row_limit=15, max_name_column_width=70)}


def probe(llm: torch.nn.Module, prefix: LlmPrefix, args: argparse.Namespace, mode: str) -> dict:
    """One compile mode: warm-up, the greedy loop, back-to-back replays, and a profile of 20 steps."""
    import torch._dynamo
    import torch._dynamo.utils as dynamo_utils
    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    result: dict = {}
    static = StaticDecoder(llm, max_batch_size=1, max_length=args.prompt + args.steps + 256, mode=mode)
    warm = time.perf_counter()
    static.warmup([1], args.prompt, args.steps)
    result["warmup_s"] = time.perf_counter() - warm
    result["graph_breaks"] = dict(dynamo_utils.counters["graph_break"])

    def greedy() -> float:
        """The runner's loop (tokens read back every step, the next step launched ahead)."""
        it = iter(GreedyBatch(llm, [prefix], [args.steps], factory=static.batch))
        next(it)  # prefill + first token
        torch.cuda.synchronize()
        first = time.perf_counter()
        for _ in it:
            pass
        torch.cuda.synchronize()
        return (args.steps - 1) / (time.perf_counter() - first)

    greedy()
    result["greedy_loop_tok_s"] = max(greedy() for _ in range(3))

    # the compiled step replayed back to back, no token read back: the GPU's own pace
    batch = static.batch([prefix], args.steps)
    token = batch.prefill().argmax(-1)
    steps = min(args.steps - 2, 100)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        batch.step(token)
    torch.cuda.synchronize()
    result["replay_tok_s"] = steps / (time.perf_counter() - start)

    profile = profile_steps(static, prefix, args.steps)
    print(f"--- {mode}")
    print(profile.pop("table"))
    result.update(profile)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=600)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--modes", default="max-autotune-no-cudagraphs",
                        help="torch.compile modes to compare, comma-separated (e.g. max-autotune-no-cudagraphs,default)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    started = time.perf_counter()
    llm = make_llm(args.tiny)
    weight_bytes = sum(p.numel() * p.element_size() for p in llm.parameters())
    log.info("LLM made in %.1fs, %.2f GB", time.perf_counter() - started, weight_bytes / 1e9)
    hidden = llm.config.hidden_size
    g = torch.Generator(device="cuda").manual_seed(1)
    embeds = torch.randn((1, args.prompt, hidden), generator=g, device="cuda", dtype=torch.float16) * 0.02
    prefix = LlmPrefix("decoder", embeds, torch.ones((1, args.prompt), dtype=torch.long, device="cuda"), frozenset())
    result: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                    "transformers": __import__("transformers").__version__, "weight_bytes": weight_bytes,
                    "modes": args.modes}
    result["copy_bandwidth"] = copy_bandwidth()
    result["roofline_tok_s_at_copy"] = result["copy_bandwidth"] / weight_bytes

    for mode in args.modes.split(","):
        result[mode] = probe(llm, prefix, args, mode)
    print(json.dumps({k: ({kk: vv for kk, vv in v.items() if kk != "top_kernels"} if isinstance(v, dict) else v)
                      for k, v in result.items()}, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
