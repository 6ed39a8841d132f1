"""Soak test of the runner: a bounded mixed load against a real `vlmforge serve`.

Valid requests (plain and streamed), clients that hang up mid-stream, malformed requests, oversized ones (text over
the character cap, too many JSON values, images over the pixel or byte limit, bodies over the request limit) and,
with a key, requests without it, at a fixed concurrency. It reports the 5xx count (must be 0), every outcome by
request kind, p50/p99 latency of the valid requests, /health's slowest answer during the load, and the server's
resident memory after a warm-up and after each round of the load (``--rounds``: a leak keeps growing from round to
round, allocator high water does not).

    python bench/soak.py [--requests 2000] [--concurrency 32] [--rounds 2]   # builds tiny-llava, starts a runner
    python bench/soak.py --url http://127.0.0.1:8000 --api-key KEY --pid PID

With ``--url`` the runner is assumed to run with the default request limits (vlmforge.runner.openai_api.Limits);
``--pid`` (its process on this machine) adds its memory. Exits 1 when a request got a 5xx or an outcome its kind
does not allow. Needs httpx (the test extra) and, to start a runner, the hf and serve extras.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import random
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from vlmforge.runner.openai_api import Limits  # noqa: E402 - after the checkout is on the path

CLOSED = 0
"""The status recorded when the server closed the connection before answering (allowed for oversized bodies)."""
PROMPTS = ["What is this?", "Question: which city is this? Answer:", "Describe the picture, please."]


# --- requests ----------------------------------------------------------------------------------------


def png(size: int | tuple[int, int], index: int = 0, fmt: str = "PNG") -> bytes:
    from PIL import Image, ImageDraw

    width, height = (size, size) if isinstance(size, int) else size
    image = Image.new("RGB", (width, height), ((50 * index) % 256, 120, 200))
    ImageDraw.Draw(image).ellipse((width // 4, height // 4, 3 * width // 4, 3 * height // 4),
                                  fill=(200, (70 * index) % 256, 40))
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


def chat(model: str, text: str | None, url: str, **fields: Any) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": url}}]
    if text is not None:
        content.insert(0, {"type": "text", "text": text})
    return {"model": model, "messages": [{"role": "user", "content": content}], **fields}


@dataclass
class Case:
    """One kind of request: its body, and the statuses it may get."""

    kind: str
    """valid, stream, disconnect, malformed, oversized or unauthorized."""
    name: str
    body: bytes
    allowed: frozenset[int]
    weight: float
    headers: dict[str, str] = field(default_factory=dict)


def cases(model: str, max_input_len: int, limits: Limits, api_key: str | None) -> list[Case]:
    """The mix: about 55% valid (10% of all streamed), 8% hanging up mid-stream, 20% malformed, 10% oversized, 7%
    without the key (when there is one)."""
    images = [data_url(png(64 + 8 * i, i)) for i in range(6)]

    def body(data: Any) -> bytes:
        return data if isinstance(data, bytes) else json.dumps(data).encode()

    out: list[Case] = []
    for i in range(12):
        valid = chat(model, PROMPTS[i % 3], images[i % 6], max_tokens=4 + 4 * (i % 2))
        out.append(Case("valid", f"valid {i}", body(valid), frozenset({200}), 45 / 12))
    for i in range(3):
        out.append(Case("stream", f"stream {i}", body(chat(model, PROMPTS[i], images[i], max_tokens=8, stream=True,
                                                            stream_options={"include_usage": True})),
                        frozenset({200}), 10 / 3))
    out.append(Case("disconnect", "hang up after the first token",
                    body(chat(model, PROMPTS[0], images[1], max_tokens=32, stream=True)), frozenset({200}), 8))
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\nshowpage\n%%EOF\n"
    malformed: dict[str, tuple[Any, int]] = {
        "not JSON": (b"{not json", 400),
        "nested 5000 deep": (b"[" * 5000 + b"]" * 5000, 400),
        "not UTF-8": (b"\xff\xfe\x00", 400),
        "bad base64": (chat(model, "hi", "data:image/png;base64,@@@"), 400),
        "not an image": (chat(model, "hi", data_url(b"just some text")), 400),
        "an EPS payload": (chat(model, "hi", data_url(eps)), 400),
        "a BMP image": (chat(model, "hi", data_url(png(32, fmt="BMP"), "image/bmp")), 400),
        "unknown model": (chat("gpt-4o", "hi", images[0]), 404),
        "two turns": ({"model": model, "messages": [{"role": "system", "content": "x"},
                                                    *chat(model, "hi", images[0])["messages"]]}, 400),
        "temperature over 2": (chat(model, "hi", images[0], temperature=2.5), 400),
        "http image URL": (chat(model, "hi", "http://169.254.169.254/latest/meta-data"), 400),
        "file URL": (chat(model, "hi", "file:///etc/passwd"), 400),
        "no image": ({"model": model, "messages": [{"role": "user", "content": "hi"}]}, 400),
        "five stop strings": (chat(model, "hi", images[0], stop=["a", "b", "c", "d", "e"]), 400),
        "max_tokens too large": (chat(model, "hi", images[0], max_tokens=10**9), 400),
        "messages not a list": ({"model": model, "messages": "hello"}, 400),
        "audio part": ({"model": model, "messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, 400),
    }
    for name, (data, status) in malformed.items():
        out.append(Case("malformed", name, body(data), frozenset({status}), 20 / len(malformed)))
    chars = max_input_len * limits.max_prompt_chars_per_token + 1
    too_big = b" " * (limits.max_image_bytes + 1024)  # a data URL's payload over the byte limit
    oversized: list[tuple[str, bytes, set[int], float]] = [
        ("text over the character cap", body(chat(model, "x" * chars, images[0])), {400}, 4.0),
        ("too many JSON values", body(chat(model, "hi", images[0], stop=["a"] * (limits.max_json_values + 1))),
         {400}, 2.0),
        ("image over the pixel limit", body(chat(model, "hi", data_url(png((5000, 5000))))), {413}, 3.0),
        ("image over the byte limit", body(chat(model, "hi", "data:image/png;base64," + base64.b64encode(too_big)
                                                .decode())), {413}, 0.5),
        ("body over the request limit", b"{" + b" " * limits.max_request_bytes + b"}", {413, CLOSED}, 0.5),
    ]
    for name, data, statuses, weight in oversized:
        out.append(Case("oversized", name, data, frozenset(statuses), weight))
    if api_key:
        out.append(Case("unauthorized", "no key", body(chat(model, "hi", images[0])), frozenset({401}), 4,
                        headers={"Authorization": ""}))
        out.append(Case("unauthorized", "wrong key", body(chat(model, "hi", images[0])), frozenset({401}), 3,
                        headers={"Authorization": "Bearer not-" + api_key}))
    return out


# --- the load -----------------------------------------------------------------------------------------


@dataclass
class Outcome:
    kind: str
    name: str
    status: int
    error: str | None
    seconds: float
    allowed: bool


async def send(client: httpx.AsyncClient, url: str, case: Case, auth: dict[str, str]) -> Outcome:
    headers = {"content-type": "application/json", **auth, **case.headers}
    headers = {k: v for k, v in headers.items() if v}
    started = time.perf_counter()
    status, error, good = CLOSED, None, False
    try:
        if case.kind in ("stream", "disconnect"):
            async with client.stream("POST", f"{url}/v1/chat/completions", content=case.body, headers=headers) as r:
                status = r.status_code
                done = False
                async for line in r.aiter_lines():
                    if case.kind == "disconnect" and '"content":"' in line and '"content":""' not in line:
                        done = True
                        break  # hang up: leaving the block closes the connection mid-stream
                    if line == "data: [DONE]":
                        done = True
                    if line.startswith("data: {\"error\""):
                        error = "error event"
                good = done and error is None
        else:
            r = await client.post(f"{url}/v1/chat/completions", content=case.body, headers=headers)
            status = r.status_code
            if case.kind == "valid":
                good = status == 200 and isinstance(r.json()["choices"][0]["message"]["content"], str)
            else:
                try:
                    good = bool(r.json()["error"]["message"])
                except (ValueError, KeyError, TypeError):
                    error = "no OpenAI error body"
    except httpx.HTTPError as exc:
        error = type(exc).__name__
    seconds = time.perf_counter() - started
    allowed = status in case.allowed and (good or status == CLOSED)
    return Outcome(case.kind, case.name, status, error, seconds, allowed)


def rss_kib(pid: int | None) -> dict[str, int] | None:
    """The process's resident memory now and at its peak (KiB), from /proc."""
    if pid is None:
        return None
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


async def run_load(url: str, model: str, mix: list[Case], requests: int, concurrency: int, seed: int,
                   auth: dict[str, str], pid: int | None, rounds: int = 1) -> dict[str, Any]:
    rng = random.Random(seed)
    picks = rng.choices(mix, weights=[c.weight for c in mix], k=requests)
    valid = [c for c in mix if c.kind == "valid"]
    limits = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        warm = await asyncio.gather(*(send(client, url, valid[i % len(valid)], auth) for i in range(concurrency)))
        if not all(o.allowed for o in warm):
            raise SystemExit(f"the warm-up failed: {[o for o in warm if not o.allowed][:3]}")
        memory_before = rss_kib(pid)
        metrics_before = await scrape(client, url, auth)
        gate = asyncio.Semaphore(concurrency)
        health: list[float] = []
        stop = asyncio.Event()

        async def one(case: Case) -> Outcome:
            async with gate:
                return await send(client, url, case, auth)

        async def probe() -> None:
            async with httpx.AsyncClient(timeout=60) as prober:
                while not stop.is_set():
                    started = time.perf_counter()
                    await prober.get(f"{url}/health")
                    health.append(time.perf_counter() - started)
                    await asyncio.sleep(0.5)

        prober = asyncio.create_task(probe())
        started = time.perf_counter()
        outcomes: list[Outcome] = []
        memory_rounds = []
        size = -(-requests // rounds)
        for start in range(0, requests, size):
            outcomes += await asyncio.gather(*(one(case) for case in picks[start:start + size]))
            await asyncio.sleep(1.0)  # let the server notice the last hang-ups
            memory_rounds.append(rss_kib(pid))
            print(f"{len(outcomes)} of {requests} requests in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        elapsed = time.perf_counter() - started
        stop.set()
        await prober
        memory_after = memory_rounds[-1]
        metrics_after = await scrape(client, url, auth)
        final = await client.get(f"{url}/health")
    latencies = sorted(o.seconds for o in outcomes if o.kind in ("valid", "stream") and o.allowed)
    statuses = Counter(o.status for o in outcomes)
    classes = Counter(f"{o.kind}: {o.name} -> {o.status or 'closed'}{' ' + o.error if o.error else ''}"
                      for o in outcomes)
    served = {k: metrics_after.get(k, 0) - metrics_before.get(k, 0) for k in metrics_after}
    return {
        "requests": requests, "concurrency": concurrency, "rounds": rounds, "seed": seed, "seconds": round(elapsed, 2),
        "requests_per_s": round(requests / elapsed, 1),
        "kinds": dict(Counter(o.kind for o in outcomes)),
        "status_counts": {str(k or "closed"): v for k, v in sorted(statuses.items())},
        "server_5xx": sum(v for k, v in statuses.items() if k >= 500),
        "server_counted_by_status": {k: int(v) for k, v in sorted(served.items()) if v},
        "unexpected": [asdict(o) for o in outcomes if not o.allowed],
        "classes": dict(sorted(classes.items())),
        "valid_latency_s": {"count": len(latencies), "p50": _quantile(latencies, 0.5),
                            "p99": _quantile(latencies, 0.99), "max": latencies[-1] if latencies else None},
        "health_latency_s": {"count": len(health), "max": round(max(health), 4) if health else None},
        "health_after": final.status_code,
        "rss_kib": {"after_warmup": memory_before, "after_each_round": memory_rounds, "after_load": memory_after},
    }


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return round(values[min(len(values) - 1, int(q * len(values)))], 4)


async def scrape(client: httpx.AsyncClient, url: str, auth: dict[str, str]) -> dict[str, float]:
    """The runner's own count of chat requests by status (vlmforge_requests_total)."""
    out: dict[str, float] = {}
    text = (await client.get(f"{url}/metrics", headers=auth)).text
    for line in text.splitlines():
        if line.startswith('vlmforge_requests_total{status="'):
            out[line.split('"')[1]] = float(line.split()[-1])
    return out


# --- a local runner -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def local_runner(workdir: Path, api_key: str, serve_args: tuple[str, ...] = ()) -> Iterator[tuple[str, int]]:
    """tiny-llava built by the real hf pipeline and served by `vlmforge serve` on loopback (the key from the
    environment, as deployments pass it; ``serve_args`` appended to its command line). Yields its URL and pid; drains
    it with SIGTERM after."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from vlmforge.build.pipeline import HfPipeline
    from vlmforge.build.workdir import Workdir
    from vlmforge.specs.catalog import load_model_or_spec

    _, engine, _ = HfPipeline(load_model_or_spec("tiny-llava", {}), Workdir(workdir / "work")).run()
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "TRANSFORMERS_VERBOSITY": "error", "VLMFORGE_API_KEY": api_key}
    log = (workdir / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "vlmforge", "serve", str(engine.path), "--port", str(port),
                             *serve_args],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"the runner exited: {(workdir / 'serve.log').read_text()[-2000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the runner did not come up in 180 s")
            time.sleep(0.3)
        yield url, proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()


# --- the run ------------------------------------------------------------------------------------------


def machine() -> str:
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or "unknown"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{cpu} x {os.cpu_count()}, load average {load:.1f} at the start"


def report(result: dict[str, Any]) -> str:
    lines = [f"{result['requests']} requests at {result['concurrency']} concurrent in {result['seconds']} s "
             f"({result['requests_per_s']}/s) on {result['machine']}",
             f"5xx: {result['server_5xx']}   unexpected outcomes: {len(result['unexpected'])}   "
             f"/health after: {result['health_after']}",
             f"statuses: {result['status_counts']}   (the runner's own count: {result['server_counted_by_status']})",
             f"valid requests: p50 {result['valid_latency_s']['p50']} s, p99 {result['valid_latency_s']['p99']} s "
             f"({result['valid_latency_s']['count']} answered); /health slowest "
             f"{result['health_latency_s']['max']} s of {result['health_latency_s']['count']}"]
    memory = result["rss_kib"]
    if memory["after_warmup"]:
        before, after = memory["after_warmup"], memory["after_load"]
        rounds = ", ".join(f"{r['VmRSS'] / 1024:.0f}" for r in memory["after_each_round"])
        lines.append(f"server RSS: {before['VmRSS'] / 1024:.0f} MiB after the warm-up, {rounds} MiB after each round, "
                     f"peak {after['VmHWM'] / 1024:.0f} MiB")
    lines.append("outcomes:")
    lines += [f"  {count:5d}  {name}" for name, count in result["classes"].items()]
    return "\n".join(lines)


def runner_arguments(parser: argparse.ArgumentParser) -> None:
    """``--url`` and ``--api-key``: a running runner, or one this script starts (the load scripts share them)."""
    parser.add_argument("--url", help="a running runner (default: build tiny-llava and start one on loopback)")
    parser.add_argument("--api-key", default=os.environ.get("VLMFORGE_API_KEY"),
                        help="the runner's key (default: $VLMFORGE_API_KEY; a started runner gets a random one)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    runner_arguments(parser)
    parser.add_argument("--pid", type=int, help="the runner's process id, for its memory (with --url)")
    parser.add_argument("--model", help="the model id (default: the runner's only model)")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=1, help="split the requests into rounds, memory read after each")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the result here")
    args = parser.parse_args(argv)
    started_on = machine()
    with tempfile.TemporaryDirectory(prefix="vlmforge-soak-") as tmp:
        if args.url:
            result = soak(args.url.rstrip("/"), args.api_key, args.pid, args)
        else:
            key = args.api_key or secrets.token_urlsafe(24)
            with local_runner(Path(tmp), key) as (url, pid):
                result = soak(url, key, pid, args)
    result["machine"] = started_on
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 1 if result["server_5xx"] or result["unexpected"] or result["health_after"] != 200 else 0


def soak(url: str, api_key: str | None, pid: int | None, args: argparse.Namespace) -> dict[str, Any]:
    auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    card = httpx.get(f"{url}/v1/models", headers=auth, timeout=30).json()["data"][0]
    model = args.model or card["id"]
    mix = cases(model, int(card["max_input_len"]), Limits(), api_key)
    return asyncio.run(run_load(url, model, mix, args.requests, args.concurrency, args.seed, auth, pid, args.rounds))


if __name__ == "__main__":
    raise SystemExit(main())
