"""Prometheus metrics of one runner (a registry of its own, so several runners can live in one process).

The list, with what each means, is in docs/serving.md ("Metrics").
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from vlmforge.runner.image_cache import CacheStats

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
"""Time per output token: an H200 decodes a 7B model's token in about 3 ms, the CPU's tiny test model in about 1."""


class _Prefix(Protocol):
    length: int


class RunningBatch(Protocol):
    """What the step hook reads of a decoding batch (:class:`vlmforge.runner.batching.GreedyBatch`)."""

    prefixes: Sequence[_Prefix]
    finish: Sequence[str | None]
    steps: int

    @property
    def kv_positions(self) -> int:
        """KV cache positions it holds (rows x columns; with in-flight batching, after joins and trims)."""
        ...


class _ImageCacheCollector:
    """The image cache's counters and size, read from the cache at every scrape (the cache counts; nothing is
    copied between the two)."""

    def __init__(self, stats: Callable[[], CacheStats]) -> None:
        self.stats = stats

    def describe(self) -> list[Any]:
        return []  # no names reserved: the series are read from the cache at each scrape

    def collect(self) -> Iterator[Any]:
        s = self.stats()
        for name, doc, value in (
            ("vlmforge_image_cache_hits", ("Images whose visual features came from the image cache (the visual "
                                           "engine skipped)."), s.hits),
            ("vlmforge_image_cache_misses", "Images not in the image cache (run through the visual engine).", s.misses),
            ("vlmforge_image_cache_evictions", "Image cache entries dropped to stay within its size.", s.evictions),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        yield GaugeMetricFamily("vlmforge_image_cache_bytes", "Bytes of visual features the image cache holds (host "
                                "memory of rank 0).", value=s.bytes)
        yield GaugeMetricFamily("vlmforge_image_cache_capacity_bytes",
                                "The image cache's size limit (--image-cache-mib).", value=s.capacity_bytes)
        yield GaugeMetricFamily("vlmforge_image_cache_entries", "Images the image cache holds.", value=s.entries)


class Metrics:
    """Requests (by HTTP status), latency, time to first token, time per output token, tokens in and out, batching,
    KV cache usage and the image cache.

    ``kv_capacity``: KV cache positions the engine is sized for (max batch size x (max input + max output length));
    0 where the runner cannot see the KV cache (TensorRT-LLM's own runner): the usage gauge then stays 0.
    """

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model: str, engine: str, tp: int, *, kv_capacity: int = 0) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        info = Gauge("vlmforge_runner_info", "The engine this runner serves (value 1).", ["model", "engine", "tp"],
                     registry=r)
        info.labels(model=model, engine=engine, tp=str(tp)).set(1)
        self.warm_start = Gauge("vlmforge_warm_start", "1 if this runner loaded a matching tune artifact (vlmforge "
                                "tune) before compiling, else 0.", registry=r)
        self.warmup_seconds = Gauge("vlmforge_warmup_seconds", "Seconds the start's warm-up (compiling the static "
                                    "decode buckets) took; 0 without --warmup.", registry=r)
        self.requests = Counter("vlmforge_requests", "Chat completion requests, by HTTP status.", ["status"],
                                registry=r)
        self.latency = Histogram("vlmforge_request_duration_seconds", "Request time, arrival to last token.",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("vlmforge_time_to_first_token_seconds", "Request arrival to its first token.",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("vlmforge_time_per_output_token_seconds",
                              "Per request of two or more tokens: (first token to last token) / (tokens - 1).",
                              buckets=TOKEN_BUCKETS, registry=r)
        self.queue_time = Histogram("vlmforge_queue_seconds", "Request arrival to the start of its batch.",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("vlmforge_prompt_tokens", "Prompt positions (text and image) of served requests.",
                                     registry=r)
        self.generation_tokens = Counter("vlmforge_generation_tokens", "Tokens generated for served requests.",
                                         registry=r)
        self.batch_size = Histogram("vlmforge_batch_size", "Requests per batch.",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.decode_steps = Counter("vlmforge_decode_steps", "LLM forward steps (one per batch token).", registry=r)
        self.queue_depth = Gauge("vlmforge_queue_depth", "Requests waiting for a batch.", registry=r)
        self.running = Gauge("vlmforge_requests_running", "Requests of the running batch still generating.",
                             registry=r)
        self.kv_capacity = kv_capacity
        self.kv_positions = Gauge(
            "vlmforge_kv_cache_positions",
            "KV cache positions the running batch holds: rows x columns of its cache (the longest prompt, padding "
            "included, + tokens generated so far; with in-flight batching after joins and trims); a finished row keeps "
            "its positions until a joiner reuses the row or the batch ends (hf engines; 0 for TensorRT-LLM).",
            registry=r)
        self.kv_usage = Gauge(
            "vlmforge_kv_cache_usage_ratio",
            "vlmforge_kv_cache_positions over the positions the runner is sized for, max_batch_size x (max_input_len "
            "+ max_output_len): a share of the worst case, not of allocated memory (the dynamic path allocates as it "
            "goes, the static path a bucket at a time).", registry=r)

    def watch_image_cache(self, stats: Callable[[], CacheStats]) -> None:
        """Export an image cache's hits, misses, evictions and bytes (read from ``stats`` at each scrape)."""
        self.registry.register(_ImageCacheCollector(stats))  # type: ignore[arg-type]  # a duck-typed collector

    def observe_step(self, batch: RunningBatch) -> None:
        """After each decode step: the rows still generating and the batch's KV cache positions."""
        self.running.set(sum(f is None for f in batch.finish))
        positions = batch.kv_positions
        self.kv_positions.set(positions)
        if self.kv_capacity:
            self.kv_usage.set(positions / self.kv_capacity)

    def batch_ended(self) -> None:
        self.running.set(0)
        self.kv_positions.set(0)
        self.kv_usage.set(0)

    def observe_request(self, status: int, *, arrived: float, first: float | None, done: float, tokens: int,
                        prompt_tokens: int, queued_s: float | None) -> None:
        """A request's end (perf_counter times): its status; for a served one, its timings and tokens."""
        self.requests.labels(status=str(status)).inc()
        if status != 200:
            return
        self.latency.observe(done - arrived)
        if first is not None:
            self.ttft.observe(first - arrived)
            if tokens > 1:
                self.tpot.observe((done - first) / (tokens - 1))
        if queued_s is not None:
            self.queue_time.observe(queued_s)
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
