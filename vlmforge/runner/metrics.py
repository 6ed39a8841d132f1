"""Prometheus metrics of one runner (a registry of its own, so several runners can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Metrics:
    """Requests (by HTTP status), latency, time to first token, tokens in and out, batching."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model: str, engine: str, tp: int) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        info = Gauge("vlmforge_runner_info", "The engine this runner serves (value 1).", ["model", "engine", "tp"],
                     registry=r)
        info.labels(model=model, engine=engine, tp=str(tp)).set(1)
        self.requests = Counter("vlmforge_requests", "Chat completion requests, by HTTP status.", ["status"],
                                registry=r)
        self.latency = Histogram("vlmforge_request_duration_seconds", "Request time, arrival to last token.",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("vlmforge_time_to_first_token_seconds", "Request arrival to its first token.",
                              buckets=LATENCY_BUCKETS, registry=r)
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
        self.running = Gauge("vlmforge_requests_running", "Requests in the batch being decoded.", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
