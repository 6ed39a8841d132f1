"""In-flight joins on the static GPU decode path (issue 16 item 2), LLaVA-1.5-7B shapes with random fp16 weights.

One run on one GPU, two static buckets (compiled with Inductor and captured in a CUDA graph): batch ``--streams``
(16) x ``--cache-length`` positions for the load, batch 1 for a lone request. It measures:

- ``teacher_forced``: a request joined into a running batch of 16 (a retired row reused) against the same prefix
  alone through the eager ``DecoderOnlyBatch``, fed the eager path's greedy tokens: argmax agreement and the largest
  logit error over ``--check-steps`` steps; the same for a row that was in the batch from its prefill (for scale).
- ``lone``: one request alone (the runner's ``GreedyBatch`` on the batch-1 bucket): TTFT (prefill + first token) and
  decode tokens/s, against the card's bandwidth roofline (weights + KV read per token).
- ``load``: ``--streams`` closed-loop clients (staggered starts, exponential think times, mixed answer lengths, the
  same seeded schedule in every mode) served by a minimal admission loop in this script that needs only the state
  interface (``prefill/step/room/join/join_many/retire``), in three admissions (``ADMISSIONS``): ``batch_boundary``
  starts a batch only when the last one is done (the scheduler before issue 16), ``inflight_single`` also joins
  arrivals into the running batch at every step with one eager prefill per joiner, ``inflight`` prefills a step
  boundary's joiners together (``join_many``, what the runner does). All use the same bucket (rows past the live
  ones are dummies, not prefilled), so only admission differs. TTFT p50/p99 (arrival to first token; the vision
  encoder is excluded, prefixes are made before the clock starts) and output tokens/s.

Needs torch (CUDA), transformers, tokenizers, numpy and vlmforge's core (pydantic: bench/README.md's wheels). Each
compiled bucket takes about 1.5 min on an H200; the whole run about 5 minutes.

    python bench/inflight_gpu.py --out bench/results/inflight_gpu.json     # the GPU machine
    python bench/inflight_gpu.py --tiny                                    # a smoke test anywhere (no compile)
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import json
import logging
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
for path in (HERE.parent, HERE):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from runner_gpu import SPEC_BANDWIDTH, build  # noqa: E402 - bench/, beside this script

from vlmforge.modeling.generation import LlmPrefix  # noqa: E402
from vlmforge.runner.batching import DecoderOnlyBatch, GreedyBatch  # noqa: E402
from vlmforge.runner.static import StaticBatch, StaticDecoder, bucket_length  # noqa: E402

log = logging.getLogger("inflight")
PAD = 1


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


# --- (a) teacher-forced: a joiner in the compiled, graph-captured step vs the prefix alone, eager -------------------


@torch.no_grad()
def eager_alone(llm: Any, prefix: LlmPrefix, steps: int) -> tuple[list[int], torch.Tensor]:
    """The prefix alone through the eager DecoderOnlyBatch, greedy: its tokens and the float logits before each."""
    state = DecoderOnlyBatch(llm, [prefix])
    logits = [state.prefill()[0].float()]
    tokens: list[int] = []
    for _ in range(steps - 1):
        tokens.append(int(logits[-1].argmax()))
        logits.append(state.step(torch.tensor([tokens[-1]], device=logits[-1].device))[0].float())
    tokens.append(int(logits[-1].argmax()))
    return tokens, torch.stack(logits).cpu()


def compare(ref_tokens: list[int], ref: torch.Tensor, got: torch.Tensor) -> dict[str, Any]:
    picks = got.argmax(-1).tolist()
    top2 = ref.topk(2, dim=-1).values
    differs = [i for i, (a, b) in enumerate(zip(ref_tokens, picks)) if a != b]
    return {"steps": len(ref_tokens), "argmax_agreement": 1 - len(differs) / len(ref_tokens),
            "max_abs_logit_error": round((got - ref).abs().max().item(), 5),
            "logit_scale": round(ref.abs().max().item(), 3),
            "eager_margin_where_argmax_differs": [round((top2[i, 0] - top2[i, 1]).item(), 4) for i in differs]}


@torch.no_grad()
def teacher_forced(static: StaticDecoder, slot: Any, pool: list[LlmPrefix], steps: int, before: int) -> dict[str, Any]:
    """Rows 0..B-1 prefilled together; row 0 and (after ``before`` steps, into retired row 5) the joiner are fed the
    eager path's greedy tokens, the other rows their own picks."""
    llm, size = static.llm, slot.batch
    joiner = pool[-1]  # made from an image and prompt no row of the batch has
    ref0_tokens, ref0 = eager_alone(llm, pool[0], steps + before + 1)
    refj_tokens, refj = eager_alone(llm, joiner, steps)
    batch = StaticBatch(static, slot, [pool[i % (len(pool) - 1)] for i in range(size)])
    logits = batch.prefill()
    row0 = [logits[0].float().cpu()]
    joined: list[torch.Tensor] = []
    row = min(5, size - 1)
    for t in range(before + steps):
        if t == before:
            batch.retire(row)
            if batch.room(joiner.length, steps) != row:
                raise RuntimeError(f"room() gave {batch.room(joiner.length, steps)}, expected retired row {row}")
            joined.append(batch.join(row, joiner).float().cpu())
        feed = logits.argmax(-1)
        feed[0] = ref0_tokens[t]
        if joined:
            feed[row] = refj_tokens[len(joined) - 1]
        logits = batch.step(feed)
        row0.append(logits[0].float().cpu())
        if joined and len(joined) < steps:
            joined.append(logits[row].float().cpu())
    return {"joiner (retired row reused, after %d steps)" % before: compare(refj_tokens, refj, torch.stack(joined)),
            "row prefilled with the batch": compare(ref0_tokens, ref0, torch.stack(row0))}


# --- lone request ---------------------------------------------------------------------------------------------------


def lone(bench: Any, static: StaticDecoder, slot: Any, prefix: LlmPrefix, new_tokens: int, repeats: int) -> dict:
    """The runner's GreedyBatch (steps launched ahead) on the batch-1 bucket: TTFT and decode tokens/s."""
    def one() -> tuple[float, float]:
        bench.sync()
        start = time.perf_counter()
        batch = GreedyBatch(bench.llm, [prefix], [new_tokens], pad_token_id=PAD,
                            factory=lambda prefixes, n: StaticBatch(static, slot, prefixes))
        stamps = [time.perf_counter() for _ in batch]
        return stamps[0] - start, (new_tokens - 1) / (stamps[-1] - stamps[0])

    one()
    runs = [one() for _ in range(repeats)]
    return {"ttft_s": round(statistics.median(r[0] for r in runs), 4),
            "decode_tok_s": round(statistics.median(r[1] for r in runs), 1), "new_tokens": new_tokens}


# --- (b) load: a minimal admission loop over the state interface ----------------------------------------------------


@dataclasses.dataclass
class Request:
    stream: int
    index: int
    prefix: LlmPrefix
    max_new: int
    arrival: float = 0.0
    first: float | None = None
    done: float | None = None
    tokens: int = 0


@dataclasses.dataclass
class Schedule:
    """Each stream's requests (answer lengths, think times) fixed in advance, the same for every mode."""

    answers: list[list[int]]
    thinks: list[list[float]]
    stagger_s: float


def schedule(streams: int, per_stream: int, lengths: list[int], think_s: float, stagger_s: float,
             seed: int) -> Schedule:
    rng = random.Random(seed)
    answers = [[rng.choice(lengths) for _ in range(per_stream)] for _ in range(streams)]
    thinks = [[rng.expovariate(1 / think_s) if think_s > 0 else 0.0 for _ in range(per_stream)]
              for _ in range(streams)]
    return Schedule(answers, thinks, stagger_s)


ADMISSIONS = {"batch_boundary": "a batch starts only when the last one is done (the scheduler before issue 16)",
              "inflight_single": "arrivals join the running batch at every step, one eager prefill per joiner",
              "inflight": "arrivals join at every step, a boundary's joiners prefilled together (join_many, the runner's "
                          "default)"}


@torch.no_grad()
def serve(static: StaticDecoder, slot: Any, pool: list[LlmPrefix], plan: Schedule, *, admission: str,
          sync: Any, batch_wait_s: float) -> dict[str, Any]:
    """Run the closed-loop clients of ``plan`` to the end; a batch is a StaticBatch in ``slot``; ``admission`` is one
    of :data:`ADMISSIONS`: with joins, arrivals join the running batch (room/join or join_many) and finished rows
    retire, else they wait for the next batch. A new batch waits up to ``batch_wait_s`` for more requests, as the
    runner's scheduler does."""
    inflight, batched = admission != "batch_boundary", admission == "inflight"
    streams = len(plan.answers)
    sync()
    start = time.perf_counter()
    arrivals: list[tuple[float, int, int]] = [(start + s * plan.stagger_s, s, 0) for s in range(streams)]
    heapq.heapify(arrivals)
    waiting: list[Request] = []
    finished: list[Request] = []
    state: StaticBatch | None = None
    rows: dict[int, Request] = {}
    last: dict[int, int] = {}  # row -> the token it is fed next
    batches = joins = steps = join_forwards = 0

    def make(stream: int, index: int, at: float) -> Request:
        prefix = pool[(stream * 7 + index) % len(pool)]
        return Request(stream, index, prefix, plan.answers[stream][index], arrival=at)

    def emit(row: int, token: int, now: float) -> None:
        request = rows[row]
        if request.first is None:
            request.first = now
        request.tokens += 1
        last[row] = token
        if request.tokens >= request.max_new:
            request.done = now
            finished.append(request)
            del rows[row]
            if state is not None and inflight:
                state.retire(row)
            nxt = request.index + 1
            if nxt < len(plan.answers[request.stream]):
                heapq.heappush(arrivals, (now + plan.thinks[request.stream][request.index], request.stream, nxt))

    while arrivals or waiting or rows:
        now = time.perf_counter()
        while arrivals and arrivals[0][0] <= now:
            at, stream, index = heapq.heappop(arrivals)
            waiting.append(make(stream, index, at))
        if not rows:
            state = None
            if not waiting:
                time.sleep(max(0.0, arrivals[0][0] - time.perf_counter()))
                continue
            deadline = time.perf_counter() + batch_wait_s
            while len(waiting) < slot.batch and arrivals and arrivals[0][0] <= deadline:
                at, stream, index = heapq.heappop(arrivals)
                time.sleep(max(0.0, at - time.perf_counter()))
                waiting.append(make(stream, index, at))
            if len(waiting) < slot.batch:
                time.sleep(max(0.0, deadline - time.perf_counter()))
            admitted, waiting = waiting[:slot.batch], waiting[slot.batch:]
            state = StaticBatch(static, slot, [r.prefix for r in admitted])
            picks = state.prefill().argmax(-1).tolist()
            batches += 1
            rows = dict(enumerate(admitted))
            now = time.perf_counter()
            for row, token in enumerate(picks):
                emit(row, token, now)
            continue
        if inflight and state is not None:
            claims: list[tuple[int, Request]] = []
            while waiting and len(rows) + len(claims) < slot.batch:
                claimed = len(claims) if batched else 0
                row = state.room(waiting[0].prefix.length, waiting[0].max_new, claimed)
                if row is None:
                    break
                claims.append((row, waiting.pop(0)))
                if not batched:  # one eager prefill per joiner, as before join_many
                    token = int(state.join(row, claims[-1][1].prefix).argmax())
                    rows[row] = claims.pop()[1]
                    joins += 1
                    emit(row, token, time.perf_counter())
            if claims:  # this boundary's joiners in one left-padded prefill
                firsts = state.join_many([(row, request.prefix) for row, request in claims])
                picks = torch.stack(firsts).argmax(-1).tolist()
                joins += len(claims)
                join_forwards += 1
                now = time.perf_counter()
                for (row, request), token in zip(claims, picks):
                    rows[row] = request
                    emit(row, token, now)
            if not rows:
                continue
        assert state is not None
        feed = torch.tensor([last.get(row, PAD) if row in rows else PAD for row in range(state.size)],
                            dtype=torch.long, device=slot.ids.device)
        picks = state.step(feed).argmax(-1).tolist()
        steps += 1
        now = time.perf_counter()
        for row in list(rows):
            emit(row, picks[row], now)
        if not inflight and not rows:
            state = None
    elapsed = max(r.done for r in finished) - start  # type: ignore[type-var]
    ttft = [r.first - r.arrival for r in finished]  # type: ignore[operator]
    tokens = sum(r.tokens for r in finished)
    return {"requests": len(finished), "output_tokens": tokens, "seconds": round(elapsed, 3),
            "tok_s": round(tokens / elapsed, 1), "ttft_p50_s": round(percentile(ttft, 50), 4),
            "ttft_p99_s": round(percentile(ttft, 99), 4), "ttft_max_s": round(max(ttft), 4),
            "batches": batches, "joins": joins, "join_prefills": join_forwards if batched else joins, "steps": steps}


# --- the run --------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a small config, no compile (smoke test of this script)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--streams", type=int, default=16, help="concurrent clients (and the batch bucket)")
    parser.add_argument("--per-stream", type=int, help="requests each client sends, one after another (6; tiny 2)")
    parser.add_argument("--answers", help="answer lengths, drawn per request (16,32,64,128,192; tiny 4,8,16)")
    parser.add_argument("--think-s", type=float, default=0.05,
                        help="mean exponential pause between a client's requests")
    parser.add_argument("--stagger-s", type=float, default=0.02, help="between the clients' first requests")
    parser.add_argument("--batch-wait-s", type=float, default=0.005, help="a new batch waits this long for more "
                        "requests (the scheduler's default)")
    parser.add_argument("--cache-length", type=int, help="positions of the load bucket (default: prompt + 4 x the "
                        "longest answer, rounded up to 256): how long a batch keeps admitting joins")
    parser.add_argument("--new-tokens", type=int, help="the lone request's answer (128; tiny 16)")
    parser.add_argument("--check-steps", type=int, help="teacher-forced steps (64; tiny 16)")
    parser.add_argument("--repeats", type=int, help="lone request runs, median (3; tiny 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mode", default="max-autotune-no-cudagraphs",
                        help="torch.compile mode of the decode step (`default` compiles in about half the time)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    for name, full, tiny in (("per_stream", 6, 2), ("answers", "16,32,64,128,192", "4,8,16"), ("new_tokens", 128, 16),
                             ("check_steps", 64, 16), ("repeats", 3, 1)):
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cuda = args.device.startswith("cuda")
    dtype = torch.float16 if cuda else torch.float32
    started = time.perf_counter()
    bench = build(args.tiny, args.device, dtype)
    # LLaVA prefixes differ by image (index % 4; index % 4 == 3 is noise seeded by the index) and prompt (index % 4)
    pool = [bench.prefix(i) for i in range(4 * (args.streams // 4) + 4)]
    prompt_len = max(p.length for p in pool)
    lengths = [int(x) for x in args.answers.split(",")]
    limit = int(bench.llm.config.max_position_embeddings)
    cache_length = args.cache_length or min(limit, bucket_length(prompt_len + 4 * max(lengths), 256, limit))
    static = StaticDecoder(bench.llm, max_batch_size=args.streams, max_length=limit, compile=cuda and not args.tiny,
                           mode=args.mode if cuda else "default")
    # rows past a batch's live ones are dummies: the load bucket serves every batch size of both modes
    log.info("bucket %d x %d (compile + graph capture)", args.streams, cache_length)
    slot = static._slot(args.streams, cache_length)
    lone_length = bucket_length(prompt_len + args.new_tokens, 256, limit)
    log.info("bucket 1 x %d", lone_length)
    lone_slot = static._slot(1, lone_length)
    llm_bytes = sum(p.numel() * p.element_size() for p in bench.llm.parameters())
    result: dict[str, Any] = {
        "model": "tiny llava (smoke test, not a measurement)" if args.tiny else "llava-1.5-7b (random fp16 weights)",
        "device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
        "transformers": __import__("transformers").__version__, "compiled": static.compile, "graphs": static.graphs,
        "prompt_positions": prompt_len, "load_bucket": [args.streams, cache_length], "lone_bucket": [1, lone_length],
        "setup_s": round(time.perf_counter() - started, 1),
    }
    log.info("teacher-forced check")
    result["teacher_forced"] = teacher_forced(static, slot, pool, args.check_steps, before=8)
    log.info("lone request")
    result["lone"] = lone(bench, static, lone_slot, pool[0], args.new_tokens, args.repeats)
    kv_per_token = 2 * bench.llm.config.num_hidden_layers * bench.llm.config.hidden_size * (2 if cuda else 4)
    bandwidth = next((v for k, v in SPEC_BANDWIDTH.items() if k in result["device"]), None)
    bytes_per_token = llm_bytes + kv_per_token * (prompt_len + args.new_tokens // 2)
    roof = bandwidth / bytes_per_token if bandwidth else None
    result["roofline"] = {"spec_bandwidth": bandwidth, "bytes_per_token": bytes_per_token,
                          "tok_s": round(roof, 1) if roof else None,
                          "lone_fraction": round(result["lone"]["decode_tok_s"] / roof, 3) if roof else None}
    log.info("so far: %s", json.dumps({k: result[k] for k in ("teacher_forced", "lone", "roofline")}))
    if args.out:  # kept now: a later failure or timeout keeps them
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".partial.json").write_text(json.dumps(result, indent=1))
    plan = schedule(args.streams, args.per_stream, lengths, args.think_s, args.stagger_s, args.seed)
    result["load"] = {"streams": args.streams, "per_stream": args.per_stream, "answers": lengths,
                      "think_s": args.think_s, "stagger_s": args.stagger_s, "batch_wait_s": args.batch_wait_s}
    result["load"]["admissions"] = ADMISSIONS
    for mode in ADMISSIONS:
        warm = schedule(args.streams, 1, lengths[:1], 0.0, 0.0, args.seed + 1)
        serve(static, slot, pool, warm, admission=mode, sync=bench.sync, batch_wait_s=args.batch_wait_s)  # untimed
        log.info("load: %s", mode)
        result["load"][mode] = serve(static, slot, pool, plan, admission=mode, sync=bench.sync,
                                     batch_wait_s=args.batch_wait_s)
        log.info("load %s: %s", mode, json.dumps(result["load"][mode]))
    lone_ttft, lone_tok_s = result["lone"]["ttft_s"], result["lone"]["decode_tok_s"]
    for mode in ADMISSIONS:
        m = result["load"][mode]
        m["ttft_p99_over_lone"] = round(m["ttft_p99_s"] / lone_ttft, 2)
        m["tok_s_over_lone"] = round(m["tok_s"] / lone_tok_s, 2)
    tf = result["teacher_forced"]
    inflight = result["load"]["inflight"]
    result["targets"] = {
        "joiner argmax agreement >= 0.95": min(v["argmax_agreement"] for v in tf.values()) >= 0.95,
        "16 streams: TTFT p99 <= 3x lone TTFT": inflight["ttft_p99_over_lone"] <= 3,
        "16 streams: throughput >= 8x a single stream": inflight["tok_s_over_lone"] >= 8,
        "batch-1 decode >= 75% of roofline": bool(roof and lone_tok_s >= 0.75 * roof),
    }
    result["total_s"] = round(time.perf_counter() - started, 1)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    # a correctness check, not a speed target: the joiner must decode as the prefix does alone
    return 0 if result["targets"]["joiner argmax agreement >= 0.95"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
