"""What per-request sampling costs the runner's decode, and whether a seed holds on the GPU.

LLaVA-1.5-7B with random fp16 weights (``bench/runner_gpu.py``'s model), the runner's static-cache decode path, in
one run: decode tokens/s at batch 1 and batch ``--concurrent`` for greedy rows (no sampler: the argmax path),
sampled rows (temperature 1, top_p 0.9, top_k 50, each row its own seeded generator), and sampled rows with 5
logprobs; then the checks (:func:`checks`): determinism at a fixed shape, the logprobs path's greedy picks, and a
row alone against the same row in a full batch, teacher-forced.

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
from vlmforge.runner.sampling import BatchSampler, SamplingParams
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


@torch.no_grad()
def forced_logits(static: Any, prefixes: list[Any], forced: torch.Tensor) -> torch.Tensor:
    """Logits [B, T, V] (float32, on the host) of a static batch fed ``forced`` [B, T] tokens: teacher forcing, so
    two runs see the same history whatever they would have picked."""
    state = static.batch(prefixes, forced.shape[1])
    out = [state.prefill().float().cpu()]
    for t in range(forced.shape[1] - 1):
        out.append(state.step(forced[:, t].to(static.device)).float().cpu())
    return torch.stack(out, dim=1)


def checks(bench: Any, static: Any, prefixes: list[Any], n: int) -> dict[str, Any]:
    """What holds on the GPU, teacher-forced where numerics enter (random weights: free-running tokens diverge on
    near-ties, which proves nothing either way):

    - the same seeded batch twice gives the same tokens (the static path is deterministic at a fixed shape);
    - the sampler's greedy rows with logprobs pick exactly the argmax of the same logits;
    - a row alone (bucket 1) against the same row in a batch of ``k`` (bucket k), fed the same tokens: logit error
      and argmax agreement (different GEMM shapes round differently: this is the size of that difference), and how
      often the same seeded draw picks the same token from the two.
    """
    k = len(prefixes)
    params = [sampled(100 + row) for row in range(k)]
    first = decode(bench, static, prefixes, params, n)[1]
    second = decode(bench, static, prefixes, params, n)[1]
    greedy = decode(bench, static, prefixes, [None] * k, n)[1]
    greedy_again = decode(bench, static, prefixes, [None] * k, n)[1]
    forced = torch.tensor([row + row[-1:] * (n - len(row)) for row in greedy], dtype=torch.long)  # ended early: pad
    batched = forced_logits(static, prefixes, forced)
    batched_again = forced_logits(static, prefixes, forced)
    on_device = batched[:, :8].to(static.device)  # the sampler on the GPU, twice on the same logits
    draws = [torch.stack([BatchSampler(params, [p.eos for p in prefixes], static.device).step(on_device[:, t])[0]
                          for t in range(on_device.shape[1])]).cpu() for _ in range(2)]
    lp = BatchSampler([SamplingParams(logprobs=3)] * k, [p.eos for p in prefixes], torch.device("cpu"))
    lp_picks = torch.stack([lp.step(batched[:, t])[0] for t in range(n)], dim=1)
    alone = forced_logits(static, prefixes[3:4], forced[3:4])[0]
    in_batch = batched[3]
    scale = in_batch.std().item()
    draws_alone = BatchSampler([sampled(7)], [prefixes[3].eos], torch.device("cpu"))
    draws_batch = BatchSampler([sampled(7)], [prefixes[3].eos], torch.device("cpu"))
    same_draws = sum(int(draws_alone.step(alone[t:t + 1])[0].item() == draws_batch.step(in_batch[t:t + 1])[0].item())
                     for t in range(n))
    return {
        "same seeded batch twice: same tokens": first == second,
        "seeded rows differ from greedy": sum(f != g for f, g in zip(first, greedy)),
        "greedy batch twice: same tokens": greedy == greedy_again,
        "teacher-forced logits twice: bitwise equal": bool(torch.equal(batched, batched_again)),
        "teacher-forced logits twice: max difference": (batched - batched_again).abs().max().item(),
        "sampler twice on the same GPU logits: same draws": bool(torch.equal(draws[0], draws[1])),
        "greedy with logprobs picks == argmax (teacher-forced)": bool((lp_picks == batched.argmax(-1)).all()),
        "row alone vs in batch, teacher-forced: argmax agreement": round(
            (alone.argmax(-1) == in_batch.argmax(-1)).float().mean().item(), 4),
        "row alone vs in batch: max logit error / logit std": [round((alone - in_batch).abs().max().item(), 4),
                                                               round(scale, 3)],
        "row alone vs in batch: same seeded draw": f"{same_draws}/{n}",
    }


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
    result["checks"] = checks(bench, static, prefixes, n)
    for size in (1, k):
        base = result["decode_tok_s"][f"batch {size} greedy"]
        result[f"batch {size} sampled / greedy"] = round(result["decode_tok_s"][f"batch {size} sampled"] / base, 3)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    exact = [key for key in result["checks"] if key.startswith(("same seeded", "greedy with"))]
    return 0 if all(result["checks"][key] for key in exact) else 1


if __name__ == "__main__":
    raise SystemExit(main())
