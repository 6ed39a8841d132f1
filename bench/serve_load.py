"""Serving under load through HTTP with the official ``openai`` client (issue 16's "Measure").

Per rate (requests/s, Poisson arrivals) it sends ``--requests`` streamed chat requests with an image, each asking
for a number of tokens drawn uniformly from ``--tokens LO HI`` (with ``min_tokens`` and ``ignore_eos`` so answers
really have that length), and reports the achieved throughput (requests/s and output tokens/s), TTFT p50/p99 (the
first content token, measured at the client), end-to-end p50/p99, time per output token p50, the mean number of
streams in flight (Little's law: the sum of latencies over the wall time) and errors by status. A lone-request
baseline: ``--baseline`` requests one after another at the top length before the rates and again after them (TTFT,
decode tokens/s and output tokens/s of one stream alone; both halves reported, since a shared machine drifts), so
issue 16's targets read off: TTFT p99 over the lone TTFT p50 (target <= 3 at 16 streams) and
output tokens/s over the lone stream's (target >= 8).

    python bench/serve_load.py --rates 0.5 1 2 4            # builds tiny-llava, starts a runner on loopback
    python bench/serve_load.py --url http://127.0.0.1:8000 --api-key KEY --rates 1 4 16 --tokens 64 256

Before/after in one run: a started runner is started twice by default, first with ``--no-inflight`` (requests
arriving during a batch wait for its end: the batching before in-flight batching), then with in-flight batching
(``--inflight``), the same schedule sent to both; the tables of both and a comparison are printed (``--inflight on``
or ``off``: one of them only). ``--inflight joins`` compares the joiners' prefill instead: in-flight batching with
each joiner prefilled alone (``--single-joins``, the admission before) then with a step boundary's joiners prefilled
together (the default). With ``--url`` the runner is measured as it serves.

Deterministic in what it sends with ``--seed`` (arrival times, lengths, prompts and images). Needs openai and httpx
(the test extra) and, to start a runner, the hf and serve extras.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import openai

sys.path.insert(0, str(Path(__file__).resolve().parent))

from soak import (  # noqa: E402 - bench/ on the path
    PROMPTS,
    _quantile,
    data_url,
    local_runner,
    machine,
    png,
    runner_arguments,
)


@dataclass(frozen=True)
class Planned:
    """One request of a rate's schedule."""

    at: float
    """Seconds after the rate's start."""
    max_tokens: int
    prompt: str
    image: int


@dataclass
class Result:
    started: float
    status: str
    """"200", an HTTP status, or the client error's name ("APIConnectionError", "APITimeoutError")."""
    ttft: float | None = None
    e2e: float | None = None
    tokens: int = 0
    asked: int = 0
    message: str | None = None


def schedule(rate: float, requests: int, tokens: tuple[int, int], rng: random.Random) -> list[Planned]:
    """Poisson arrivals at ``rate`` per second (exponential gaps), lengths uniform in ``tokens``."""
    at, out = 0.0, []
    for _ in range(requests):
        out.append(Planned(at, rng.randint(*tokens), rng.choice(PROMPTS), rng.randrange(6)))
        at += rng.expovariate(rate)
    return out


async def one(client: openai.AsyncOpenAI, model: str, images: list[str], plan: Planned, t0: float) -> Result:
    await asyncio.sleep(max(0.0, t0 + plan.at - time.perf_counter()))
    started = time.perf_counter()
    result = Result(started - t0, "200", asked=plan.max_tokens)
    content = [{"type": "text", "text": plan.prompt}, {"type": "image_url", "image_url": {"url": images[plan.image]}}]
    try:
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": content}], max_tokens=plan.max_tokens, stream=True,
            stream_options={"include_usage": True}, temperature=0.0,
            extra_body={"min_tokens": plan.max_tokens, "ignore_eos": True})
        async for chunk in stream:
            if result.ttft is None and chunk.choices and chunk.choices[0].delta.content:
                result.ttft = time.perf_counter() - started
            if chunk.usage is not None:
                result.tokens = chunk.usage.completion_tokens
        result.e2e = time.perf_counter() - started
    except openai.APIStatusError as exc:
        result.status, result.message = str(exc.status_code), exc.message
    except openai.APIError as exc:  # connection errors, timeouts, an error event mid-stream
        result.status, result.message = type(exc).__name__, str(exc)
    return result


def summarize(results: list[Result], wall: float) -> dict[str, Any]:
    ok = [r for r in results if r.status == "200" and r.e2e is not None and r.ttft is not None]
    tokens = sum(r.tokens for r in ok)
    tpot = sorted((r.e2e - r.ttft) / (r.tokens - 1) for r in ok if r.tokens > 1)
    ttft, e2e = sorted(r.ttft for r in ok), sorted(r.e2e for r in ok)
    return {
        "requests": len(results), "ok": len(ok), "wall_s": round(wall, 2),
        "requests_per_s": round(len(ok) / wall, 3), "output_tokens_per_s": round(tokens / wall, 1),
        "short_answers": sum(r.tokens != r.asked for r in ok),
        "ttft_s": {"p50": _quantile(ttft, 0.5), "p99": _quantile(ttft, 0.99)},
        "e2e_s": {"p50": _quantile(e2e, 0.5), "p99": _quantile(e2e, 0.99)},
        "tpot_s": {"p50": _quantile(tpot, 0.5)},
        "mean_in_flight": round(sum(r.e2e for r in ok) / wall, 2),
        "errors": dict(Counter(r.status for r in results if r.status != "200")),
        "error_messages": sorted({f"{r.status}: {r.message}" for r in results if r.status != "200"})[:5],
    }


async def measure(url: str, api_key: str | None, model: str | None, args: argparse.Namespace) -> dict[str, Any]:
    images = [data_url(png(64 + 8 * i, i)) for i in range(6)]
    http = httpx.AsyncClient(timeout=httpx.Timeout(600), limits=httpx.Limits(max_connections=1000,
                                                                             max_keepalive_connections=100))
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=api_key or "none", http_client=http, max_retries=0)
    cards = (await client.models.list()).data
    card = next((c for c in cards if c.id == model), None) if model else cards[0]
    if card is None:
        raise SystemExit(f"--model {model}: the runner serves {[c.id for c in cards]}")
    model, longest = card.id, (card.model_extra or {}).get("max_output_len")
    if longest is not None and args.tokens[1] > longest:
        raise SystemExit(f"--tokens {args.tokens[0]} {args.tokens[1]}: {model}'s max_output_len is {longest}; "
                         f"pass --tokens with HI at most {longest}")
    rng = random.Random(args.seed)
    top = args.tokens[1]
    await one(client, model, images, Planned(0.0, top, PROMPTS[0], 0), time.perf_counter())  # warm-up, not counted
    before = await lone_streams(client, model, images, top, args.baseline)
    print(f"lone stream: {lone_figures(before)}", file=sys.stderr)
    rates = []
    for rate in args.rates:
        plan = schedule(rate, args.requests, tuple(args.tokens), rng)
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(client, model, images, p, t0) for p in plan))
        row = {"rate": rate, **summarize(results, time.perf_counter() - t0)}
        rates.append(row)
        print(f"rate {rate}/s: {row['ok']} of {row['requests']} ok in {row['wall_s']} s", file=sys.stderr)
    after = await lone_streams(client, model, images, top, args.baseline)
    await http.aclose()
    lone = {"before": lone_figures(before), "after": lone_figures(after), **lone_figures(before + after)}
    for row in rates:
        row["ttft_p99_over_lone"] = (round(row["ttft_s"]["p99"] / lone["ttft_s_p50"], 2)
                                     if row["ttft_s"]["p99"] else None)
        row["tokens_per_s_over_lone"] = round(row["output_tokens_per_s"] / lone["output_tokens_per_s"], 2)
    return {"url": url, "model": model, "seed": args.seed, "tokens": args.tokens, "requests_per_rate": args.requests,
            "baseline": lone, "rates": rates}


async def lone_streams(client: openai.AsyncOpenAI, model: str, images: list[str], tokens: int,
                       count: int) -> list[Result]:
    """``count`` requests of ``tokens`` tokens one after another, nothing else in flight."""
    out = []
    for i in range(count):
        out.append(await one(client, model, images, Planned(0.0, tokens, PROMPTS[i % 3], i % 6), time.perf_counter()))
    if not any(r.status == "200" for r in out):
        raise SystemExit(f"no lone request succeeded: {[asdict(r) for r in out]}")
    return out


def lone_figures(results: list[Result]) -> dict[str, Any]:
    """A lone stream's TTFT p50, decode tokens/s (after the first token) and output tokens/s (over its whole time)."""
    good = [r for r in results if r.status == "200" and r.ttft is not None and r.e2e is not None]
    return {
        "requests": len(results), "max_tokens": results[0].asked,
        "ttft_s_p50": _quantile(sorted(r.ttft for r in good), 0.5),
        "decode_tokens_per_s": round(statistics.median([(r.tokens - 1) / (r.e2e - r.ttft) for r in good]), 1),
        "output_tokens_per_s": round(statistics.median([r.tokens / r.e2e for r in good]), 1),
        "errors": dict(Counter(r.status for r in results if r.status != "200")),
    }


def table(result: dict[str, Any]) -> str:
    b = result["baseline"]
    head = ["rate/s", "ok", "req/s", "out tok/s", "in flight", "TTFT p50", "TTFT p99", "E2E p50", "E2E p99",
            "TPOT p50", "TTFT p99/lone", "tok/s / lone", "errors"]
    rows = [[str(r["rate"]), f"{r['ok']}/{r['requests']}", str(r["requests_per_s"]), str(r["output_tokens_per_s"]),
             str(r["mean_in_flight"]), str(r["ttft_s"]["p50"]), str(r["ttft_s"]["p99"]), str(r["e2e_s"]["p50"]),
             str(r["e2e_s"]["p99"]), str(r["tpot_s"]["p50"]), str(r["ttft_p99_over_lone"]),
             str(r["tokens_per_s_over_lone"]), json.dumps(r["errors"]) if r["errors"] else "-"]
            for r in result["rates"]]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    lines = [f"{result['model']} at {result['url']}, {result['requests_per_rate']} requests per rate, answers of "
             f"{result['tokens'][0]}..{result['tokens'][1]} tokens, seed {result['seed']}; {result['machine']}",
             f"lone stream ({b['max_tokens']} tokens, {b['before']['requests']} requests before the rates and "
             f"{b['after']['requests']} after): TTFT p50 {b['ttft_s_p50']} s (before {b['before']['ttft_s_p50']}, "
             f"after {b['after']['ttft_s_p50']}), decode {b['decode_tokens_per_s']} tok/s, "
             f"{b['output_tokens_per_s']} output tok/s (before {b['before']['output_tokens_per_s']}, after "
             f"{b['after']['output_tokens_per_s']}); the ratios below are against the pooled figures",
             "| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |",
             "| " + " | ".join("-" * w for w in widths) + " |"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    return "\n".join(lines)


LABELS = {"off": "inflight off", "on": "inflight on", "single": "inflight on, single joins"}
"""What each mode's results are called (the JSON's keys, the tables' titles)."""


def comparison(before: dict[str, Any], after: dict[str, Any]) -> str:
    """Per rate, before -> after: throughput, TTFT p50/p99, end-to-end p99."""
    lines = ["| offered req/s | output tok/s before -> after | TTFT p50 before -> after | TTFT p99 before -> after "
             "| end-to-end p99 before -> after | errors before / after |",
             "| ---: | --- | --- | --- | --- | --- |"]
    for b, a in zip(before["rates"], after["rates"], strict=True):
        errors = f"{sum(b['errors'].values())} / {sum(a['errors'].values())}"
        lines.append(f"| {b['rate']} | {b['output_tokens_per_s']} -> {a['output_tokens_per_s']} | "
                     f"{b['ttft_s']['p50']} -> {a['ttft_s']['p50']} s | {b['ttft_s']['p99']} -> {a['ttft_s']['p99']} s | "
                     f"{b['e2e_s']['p99']} -> {a['e2e_s']['p99']} s | {errors} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    runner_arguments(parser)
    parser.add_argument("--model", help="the model id (default: the runner's first model)")
    parser.add_argument("--rates", type=float, nargs="+", default=[0.5, 1.0, 2.0], help="requests per second")
    parser.add_argument("--requests", type=int, default=40, help="requests per rate")
    parser.add_argument("--tokens", type=int, nargs=2, default=[8, 32], metavar=("LO", "HI"),
                        help="answer lengths, uniform in LO..HI")
    parser.add_argument("--baseline", type=int, default=5,
                        help="lone requests before the rates and again after them (the baseline)")
    parser.add_argument("--max-batch-size", type=int, help="the started runner's --max-batch-size (default: engine's)")
    parser.add_argument("--inflight", choices=["both", "on", "off", "single", "joins"], default="both",
                        help="a started runner: in-flight batching off (before), then on (after), in one run; or one; "
                             "joins: in-flight with single-request joins (before), then batched joins (after)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the result here")
    args = parser.parse_args(argv)
    if not 1 <= args.tokens[0] <= args.tokens[1]:
        parser.error(f"--tokens {args.tokens[0]} {args.tokens[1]}: need 1 <= LO <= HI")
    if any(rate <= 0 for rate in args.rates) or args.requests < 1 or args.baseline < 1:
        parser.error("--rates must be positive, --requests and --baseline at least 1")
    started_on = machine()
    if args.url:
        result = asyncio.run(measure(args.url.rstrip("/"), args.api_key, args.model, args))
        results = {"as served": result}
    else:
        serve = ("--max-batch-size", str(args.max_batch_size)) if args.max_batch_size else ()
        modes = {"both": ["off", "on"], "joins": ["single", "on"]}.get(args.inflight, [args.inflight])
        flags = {"on": ("--inflight",), "off": ("--no-inflight",), "single": ("--inflight", "--single-joins")}
        results = {}
        with tempfile.TemporaryDirectory(prefix="vlmforge-serve-load-") as tmp:
            key = args.api_key or secrets.token_urlsafe(24)
            for mode in modes:  # the same seed: the same schedule for both
                with local_runner(Path(tmp), key, (*serve, *flags[mode])) as (url, _):
                    results[LABELS[mode]] = asyncio.run(measure(url, key, args.model, args))
                print(f"{LABELS[mode]} done", file=sys.stderr)
    for label, result in results.items():
        result["machine"] = started_on
        result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
        print(f"## {label}\n{table(result)}\n")
    if len(results) == 2:
        first, second = results
        print(f"## before ({first}) -> after ({second})\n{comparison(*results.values())}")
    if args.json:
        out = next(iter(results.values())) if len(results) == 1 else results
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
