"""What per-request sampling costs the runner's decode, and whether a seed holds on the GPU.

LLaVA-1.5-7B with random fp16 weights (``bench/runner_gpu.py``'s model), the runner's static-cache decode path, in
one run: decode tokens/s at batch 1 and batch ``--concurrent`` for greedy rows (no sampler: the argmax path),
sampled rows (temperature 1, top_p 0.9, top_k 50, each row its own seeded generator), and sampled rows with 5
logprobs; then the checks: a seeded row gives the same tokens alone and in a full batch, and greedy rows with
logprobs give the greedy tokens.

    python bench/sampling_gpu.py --out bench/results/sampling_gpu.json     # the GPU machine (wheels: bench/README.md)
    python bench/sampling_gpu.py --tiny                                    # a smoke test anywhere
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from runner_gpu import build  # bench/, beside this script

from vlmforge.runner.batching import GreedyBatch
from vlmforge.runner.sampling import SamplingParams
from vlmforge.runner.static import StaticDecoder


def sampled(seed: int, logprobs: int | None = None) -> SamplingParams:
    return SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=seed, logprobs=logprobs)


MODES: dict[str, Any] = {
    "greedy": lambda row: None,
    "sampled": lambda row: sampled(1000 + row),
    "sampled+logprobs5": lambda row: sampled(1000 + row, 5),
}


def decode(bench: Any, static: Any, prefixes: list[Any], params: list[Any], new_tokens: int) -> tuple[float, list]:
    """Decode tokens/s of one batch (first token to last, from the batch's own events) and its tokens."""
    bench.sync()
    batch = GreedyBatch(bench.llm, prefixes, [new_tokens] * len(prefixes), factory=static.batch, sampling=params)
    stamps = [time.perf_counter() for _ in batch]
    return len(prefixes) * (new_tokens - 1) / (stamps[-1] - stamps[0]), batch.tokens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--concurrent", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    started = time.perf_counter()
    bench = build(args.tiny, args.device, dtype)
    n, k = args.new_tokens, args.concurrent
    prefixes = [bench.prefix(i) for i in range(k)]
    prompt_len = max(p.length for p in prefixes)
    cuda = args.device.startswith("cuda")
    static = StaticDecoder(bench.llm, max_batch_size=k, max_length=prompt_len + n + 256, compile=cuda, mode="default")
    static.warmup([1, k], prompt_len, n)
    result: dict[str, Any] = {
        "model": "llava-1.5-7b (random fp16 weights)" if not args.tiny else "tiny llava (smoke test)",
        "device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
        "new_tokens": n, "concurrent": k, "setup_s": round(time.perf_counter() - started, 1), "decode_tok_s": {},
    }
    for size in (1, k):
        rows = prefixes[:size]
        for name, make in MODES.items():
            params = [make(row) for row in range(size)]
            decode(bench, static, rows, params, n)  # untimed: first use of this shape and mode
            runs = [decode(bench, static, rows, params, n)[0] for _ in range(args.repeats)]
            result["decode_tok_s"][f"batch {size} {name}"] = round(statistics.median(runs), 1)
    alone = decode(bench, static, prefixes[3:4], [sampled(7)], n)[1][0]
    params = [sampled(100 + row) for row in range(k)]
    params[3] = sampled(7)
    batched = decode(bench, static, prefixes, params, n)[1]
    greedy = decode(bench, static, prefixes, [None] * k, n)[1]
    with_logprobs = decode(bench, static, prefixes, [SamplingParams(logprobs=3)] * k, n)[1]
    result["checks"] = {
        "seeded row alone == in a full batch": batched[3] == alone,
        "seeded rows differ from greedy": sum(b != g for b, g in zip(batched, greedy)),
        "greedy with logprobs == greedy": with_logprobs == greedy,
    }
    for size in (1, k):
        base = result["decode_tok_s"][f"batch {size} greedy"]
        result[f"batch {size} sampled / greedy"] = round(result["decode_tok_s"][f"batch {size} sampled"] / base, 3)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0 if all(v for v in result["checks"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
