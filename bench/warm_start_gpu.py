"""Cold vs warm starts of the runner's static decode path (LLaVA-1.5-7B's LLM shapes, random fp16 weights), in one run.

Each start is a fresh process with its own empty Inductor and Triton cache directories (nothing compiled earlier
can leak into it), timed from the process's start to the end of the warm-up of the batch buckets (``--batches``,
default 1 and 16, as ``serve --warmup`` warms them: a prompt of one image's features and some text):

1. **cold**: the warm-up compiles just in time and autotunes (what a start without a tune artifact does); then
   ``torch.compiler.save_cache_artifacts()`` is written to a file;
2. **tune**: what ``vlmforge tune --precompile`` adds: after the same just-in-time warm-up, each bucket's step
   compiled ahead of time (``vlmforge.runner.precompile``) and saved as a package;
3. **warm**: ``torch.compiler.load_cache_artifacts()`` of the cold start's caches (a tune artifact of compile caches
   alone, as vlmforge stored them before step packages), then the same warm-up: Dynamo still traces the model;
4. **precompiled**: the tune start's packages loaded (what ``serve`` does with a tune artifact now), then the warm-up:
   nothing is traced or compiled.

Every start then computes teacher-forced logits of the same fixed prompt and tokens through the batch-1 bucket; each
must give the cold start's argmax. Printed: one JSON with each start's seconds (start-to-warmed and the warm-up
alone), the graphs Dynamo traced, Inductor's FX graph cache hits and misses, the artifacts' MiB and the logits check.

    python bench/warm_start_gpu.py [--batches 1,16] [--mode max-autotune-no-cudagraphs] [--out FILE]
    python bench/warm_start_gpu.py --tiny        # a small model on the CPU (Inductor's C++ backend)

It drives ``vlmforge.runner.static`` directly, as the runner does; on the GPU machine install pydantic from the
wheelhouse first (bench/README.md: ``pip install --no-index --find-links bench/wheelhouse -r bench/wheels.txt``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

STARTED = time.perf_counter()  # a start is timed from here: imports, model, warm-up
ROOT = Path(__file__).resolve().parents[1]
PHASES = ("cold", "tune", "warm", "precompiled")


def make_llm(tiny: bool, device: str) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if tiny:
        config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024)
    else:  # Vicuna-7B, the LLM of llava-hf/llava-1.5-7b-hf
        config = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                             rms_norm_eps=1e-5)
    torch.manual_seed(0)
    dtype = torch.float32 if tiny else torch.float16
    torch.set_default_dtype(dtype)
    with torch.device(device):
        llm = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    llm.generation_config.eos_token_id = None
    return llm.eval()


def child(args: argparse.Namespace) -> int:
    """One start (cold or warm): the warm-up, then the teacher-forced logits; results to ``args.result``."""
    import torch
    from torch._dynamo.utils import counters

    sys.path.insert(0, str(ROOT))
    from vlmforge.modeling.generation import LlmPrefix
    from vlmforge.runner.static import StaticDecoder

    from vlmforge.runner.tune import unbundle

    device = "cpu" if args.tiny else "cuda"
    loaded, packages = None, {}
    caches_file, packages_file = Path(args.artifacts + ".caches"), Path(args.artifacts + ".steps")
    if args.phase in ("warm", "precompiled"):
        started = time.perf_counter()
        if args.phase == "warm":
            info = torch.compiler.load_cache_artifacts(caches_file.read_bytes())
            loaded = {"artifacts": {k: len(v) for k, v in (info.artifacts.items() if info else []) if v}}
        else:
            _, packages = unbundle(packages_file.read_bytes())
            loaded = {"packages": len(packages)}
        loaded["seconds"] = time.perf_counter() - started
    llm = make_llm(args.tiny, device)
    made = time.perf_counter() - STARTED
    batches = [int(b) for b in args.batches.split(",")]
    decoder = StaticDecoder(llm, max_batch_size=max(batches), max_length=args.prompt + args.new_tokens + 256,
                            compile=True, mode=args.mode, graphs=None if not args.tiny else False)
    decoder.preload(packages)
    warm_started = time.perf_counter()
    decoder.warmup(batches, args.prompt, args.new_tokens)
    if device == "cuda":
        torch.cuda.synchronize()
    warmup_s = time.perf_counter() - warm_started
    start_s = time.perf_counter() - STARTED
    result: dict[str, Any] = {
        "phase": args.phase, "start_to_warm_s": round(start_s, 2), "warmup_s": round(warmup_s, 2),
        "model_made_s": round(made, 2), "loaded": loaded,
        "fxgraph_cache_hit": int(counters["inductor"]["fxgraph_cache_hit"]),
        "fxgraph_cache_miss": int(counters["inductor"]["fxgraph_cache_miss"]),
        "graphs_traced": int(counters["stats"]["unique_graphs"]),
        "precompiled": [list(b) for b in decoder.precompiled],
    }
    if args.phase == "cold":
        saved = torch.compiler.save_cache_artifacts()
        if saved is None:
            raise SystemExit("torch.compiler.save_cache_artifacts() returned None: nothing to store")
        data, info = saved
        caches_file.write_bytes(data)
        result["artifact_bytes"] = len(data)
        result["artifacts"] = {k: len(v) for k, v in info.artifacts.items() if v}
    if args.phase == "tune":
        from vlmforge.runner.tune import bundle

        started = time.perf_counter()
        made = decoder.compile_packages()
        result["precompile_s"] = round(time.perf_counter() - started, 2)
        data = bundle(b"", made)
        packages_file.write_bytes(data)
        result["artifact_bytes"] = len(data)
        result["packages"] = len(made)
    # teacher-forced logits through the batch-1 bucket: a fixed prompt and fixed tokens, on the compiled step
    hidden = llm.config.hidden_size
    gen = torch.Generator(device="cpu").manual_seed(1)
    dtype = llm.get_input_embeddings().weight.dtype
    embeds = (torch.randn((1, args.prompt, hidden), generator=gen) * 0.02).to(device=device, dtype=dtype)
    tokens = torch.randint(0, llm.config.vocab_size, (args.check_tokens,), generator=gen).to(device)
    prefix = LlmPrefix("decoder", embeds, torch.ones((1, args.prompt), dtype=torch.long, device=device), frozenset())
    batch = decoder.batch([prefix], args.new_tokens)
    logits = [batch.prefill().float().cpu()]
    for token in tokens:
        logits.append(batch.step(token.view(1)).float().cpu())
    torch.save(torch.cat(logits), args.logits)
    Path(args.result).write_text(json.dumps(result))
    return 0


def run_start(phase: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """One start in a fresh process with empty compile caches."""
    cache = work / f"cache-{phase}"
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"), "TRITON_CACHE_DIR": str(cache / "triton")}
    argv = [sys.executable, __file__, "--child", "--phase", phase, "--artifacts", str(work / "artifacts.bin"),
            "--result", str(work / f"{phase}.json"), "--logits", str(work / f"{phase}.pt"), "--batches", args.batches,
            "--mode", args.mode, "--prompt", str(args.prompt), "--new-tokens", str(args.new_tokens),
            "--check-tokens", str(args.check_tokens)] + (["--tiny"] if args.tiny else [])
    started = time.perf_counter()
    subprocess.run(argv, env=env, check=True)
    result = json.loads((work / f"{phase}.json").read_text())
    result["process_s"] = round(time.perf_counter() - started, 2)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a small model on the CPU (smoke test)")
    parser.add_argument("--batches", default="1,16", help="batch sizes warmed up, comma-separated")
    parser.add_argument("--mode", default=None, help="torch.compile mode (default: max-autotune-no-cudagraphs; "
                        "--tiny: default)")
    parser.add_argument("--prompt", type=int, default=None, help="prompt positions (default 608: 576 image "
                        "features + 32, as serve --warmup)")
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--check-tokens", type=int, default=16, help="teacher-forced steps of the logits check")
    parser.add_argument("--starts", default=",".join(PHASES), help="the starts to run, comma-separated, of "
                        f"{', '.join(PHASES)} (warm needs cold, precompiled needs tune; the first is the logits' "
                        "reference). tune's warm-up is a cold start's: 'tune,precompiled' measures both in two starts")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--work", type=Path, help="keep each start's results, logits and the artifact here "
                        "(default: a temporary directory)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for name in ("--phase", "--artifacts", "--result", "--logits"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.mode = args.mode or ("default" if args.tiny else "max-autotune-no-cudagraphs")
    args.prompt = args.prompt or (48 if args.tiny else 608)
    if args.tiny:
        args.new_tokens = min(args.new_tokens, 32)
    if args.child:
        return child(args)
    import torch

    phases = [phase for phase in PHASES if phase in args.starts.split(",")]
    unknown = set(args.starts.split(",")) - set(PHASES)
    if unknown or not phases or ("warm" in phases and "cold" not in phases) or (
            "precompiled" in phases and "tune" not in phases):
        parser.error(f"--starts {args.starts!r}: choose from {', '.join(PHASES)}; warm needs cold, precompiled tune")
    with tempfile.TemporaryDirectory(prefix="warm-start-") as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        starts = {}
        for phase in phases:
            starts[phase] = run_start(phase, args, work)
            print(f"start {phase}: {json.dumps(starts[phase])}", flush=True)  # kept in the log if a later one dies
        logits = {phase: torch.load(work / f"{phase}.pt") for phase in phases}
    reference = logits[phases[0]]
    report = {
        "device": "cpu (tiny model)" if args.tiny else torch.cuda.get_device_name(0),
        "torch": torch.__version__, "mode": args.mode, "batches": args.batches, "prompt": args.prompt,
        "new_tokens": args.new_tokens, "starts_run": phases, "logits_reference": phases[0],
        "start_to_warm_s": {phase: start["start_to_warm_s"] for phase, start in starts.items()},
        "warmup_s": {phase: start["warmup_s"] for phase, start in starts.items()},
        "graphs_traced": {phase: start["graphs_traced"] for phase, start in starts.items()},
        "fxgraph": {phase: [start["fxgraph_cache_hit"], start["fxgraph_cache_miss"]] for phase, start in starts.items()}
        | {"as": "[hits, misses]"},
        "tune_precompile_s": starts["tune"]["precompile_s"] if "tune" in starts else None,
        "artifact_mib": {kind: round(starts[phase]["artifact_bytes"] / 2**20, 2)
                         for kind, phase in (("caches", "cold"), ("step_packages", "tune")) if phase in starts},
        "load_s": {phase: round(starts[phase]["loaded"]["seconds"], 3) for phase in ("warm", "precompiled")
                   if phase in starts},
        f"logits_max_abs_diff_vs_{phases[0]}": {phase: (logits[phase] - reference).abs().max().item()
                                                  for phase in phases[1:]},
        f"same_argmax_as_{phases[0]}": {phase: bool((logits[phase].argmax(-1) == reference.argmax(-1)).all())
                                         for phase in phases[1:]},
        "starts": starts,
    }
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    ok = (all(report[f"same_argmax_as_{phases[0]}"].values())
          and ("precompiled" not in starts or starts["precompiled"]["graphs_traced"] == 0)
          and ("warm" not in starts or starts["warm"]["fxgraph_cache_miss"] == 0)
          and ("precompiled" not in starts
               or len(starts["precompiled"]["precompiled"]) == starts["tune"]["packages"] > 0))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
