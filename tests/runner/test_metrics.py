"""The runner's metrics: scraped from a real runner over HTTP, and observed step by step from a real scheduler."""

from __future__ import annotations

import base64
import io
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from PIL import Image

from tests.helpers.runners import Runner, chat_body
from tests.runner.test_server import metric


def _noise_url(seed: int) -> str:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (48, 48, 3), generator=generator, dtype=torch.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy(), "RGB").save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _ask(runner: Runner, url: str, max_tokens: int = 6) -> dict:
    response = httpx.post(f"{runner.url}/v1/chat/completions", json=chat_body("What is this?", url,
                                                                              max_tokens=max_tokens), timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def test_image_cache_hits_misses_and_bytes_move_on_a_real_runner(runner: Runner) -> None:
    names = ("vlmforge_image_cache_hits_total", "vlmforge_image_cache_misses_total", "vlmforge_image_cache_bytes",
             "vlmforge_image_cache_entries")
    before = {name: metric(runner, name) for name in names}
    url = _noise_url(1601)
    first = _ask(runner, url)
    after_miss = {name: metric(runner, name) for name in names}
    assert after_miss["vlmforge_image_cache_misses_total"] == before["vlmforge_image_cache_misses_total"] + 1
    assert after_miss["vlmforge_image_cache_hits_total"] == before["vlmforge_image_cache_hits_total"]
    assert after_miss["vlmforge_image_cache_entries"] == before["vlmforge_image_cache_entries"] + 1
    assert after_miss["vlmforge_image_cache_bytes"] > before["vlmforge_image_cache_bytes"]
    second = _ask(runner, url)
    assert metric(runner, "vlmforge_image_cache_hits_total") == before["vlmforge_image_cache_hits_total"] + 1
    assert metric(runner, "vlmforge_image_cache_misses_total") == after_miss["vlmforge_image_cache_misses_total"]
    assert second["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]
    assert metric(runner, "vlmforge_image_cache_capacity_bytes") == 512 * 1024 * 1024  # the default
    assert metric(runner, "vlmforge_image_cache_evictions_total") == 0


def test_image_cache_mib_0_serves_without_a_cache(tiny_engine: Path, tmp_path: Path) -> None:
    from tests.helpers.runners import start_runner, stop_runner

    started = start_runner(tiny_engine, tmp_path / "serve.log", args=("--image-cache-mib", "0"))
    try:
        url = _noise_url(1603)
        answers = [_ask(started, url)["choices"][0]["message"]["content"] for _ in range(2)]
        assert answers[0] == answers[1]
        text = httpx.get(f"{started.url}/metrics").text
        assert "vlmforge_image_cache" not in text and "vlmforge_time_per_output_token_seconds" in text
    finally:
        assert stop_runner(started) == 0


def test_time_per_output_token_latency_and_idle_gauges_on_a_real_runner(runner: Runner) -> None:
    names = ("vlmforge_time_per_output_token_seconds_count", "vlmforge_time_per_output_token_seconds_sum",
             "vlmforge_request_duration_seconds_count", "vlmforge_time_to_first_token_seconds_count")
    before = {name: metric(runner, name) for name in names}
    answer = _ask(runner, _noise_url(1602), max_tokens=8)
    tokens = answer["usage"]["completion_tokens"]
    assert metric(runner, "vlmforge_request_duration_seconds_count") == \
        before["vlmforge_request_duration_seconds_count"] + 1
    assert metric(runner, "vlmforge_time_to_first_token_seconds_count") == \
        before["vlmforge_time_to_first_token_seconds_count"] + 1
    counted = 1 if tokens > 1 else 0  # a one-token answer has no time between tokens
    assert metric(runner, "vlmforge_time_per_output_token_seconds_count") == \
        before["vlmforge_time_per_output_token_seconds_count"] + counted
    if counted:
        spent = metric(runner, "vlmforge_time_per_output_token_seconds_sum") - \
            before["vlmforge_time_per_output_token_seconds_sum"]
        assert 0 < spent < 5
    for idle in ("vlmforge_requests_running", "vlmforge_queue_depth", "vlmforge_kv_cache_positions",
                 "vlmforge_kv_cache_usage_ratio"):
        assert metric(runner, idle) == 0, idle


def test_running_rows_and_kv_usage_follow_the_batch_step_by_step(tiny_engine: Path) -> None:
    """A real scheduler and engine: two requests in one batch, one ending after 2 tokens, the other after 6. What the
    metrics say at each token is recorded from the sink (the scheduler thread, between steps)."""
    from vlmforge.runner.engine import HfEngine
    from vlmforge.runner.metrics import Metrics
    from vlmforge.runner.scheduler import Finished, GenRequest, Scheduler, Token

    engine = HfEngine(tiny_engine)
    capacity = 4 * (engine.limits.max_input_len + engine.limits.max_output_len)
    metrics = Metrics("tiny", "dir", 1, kv_capacity=capacity)
    scheduler = Scheduler(engine, max_batch_size=4, metrics=metrics, batch_wait_s=0.2)
    seen: dict[int, list[tuple[float, float, float]]] = {0: [], 1: []}
    health: dict[int, list[int]] = {0: [], 1: []}
    done = threading.Event()
    ended: list[str] = []

    def sink_of(index: int) -> Any:
        def sink(event: Any) -> None:
            if isinstance(event, Token):
                value = metrics.registry.get_sample_value
                seen[index].append((value("vlmforge_requests_running"), value("vlmforge_kv_cache_positions"),
                                    value("vlmforge_kv_cache_usage_ratio")))
                health[index].append(scheduler.running)  # what /health reports as running
            elif isinstance(event, Finished):
                ended.append(event.reason)
                if len(ended) == 2:
                    done.set()
        return sink

    image = Image.new("RGB", (40, 40), (10, 200, 30))
    prompt = "What is this?"
    length = engine.prompt_length(prompt)
    # eos could end a row early on random weights: the limits are what the test reads, so check what happened
    requests = [GenRequest(image, prompt, limit, length, sink_of(i)) for i, limit in enumerate((2, 6))]
    for request in requests:
        scheduler.submit(request)
    scheduler.start()
    try:
        assert done.wait(60)
    finally:
        scheduler.stop(10)
    longest = max(len(seen[0]), len(seen[1]))
    assert len(seen[0]) <= 2 and longest >= 3, seen
    for index in (0, 1):
        for step, (running, positions, ratio) in enumerate(seen[index]):
            if step == 0:
                continue  # the first token's events come before the first hook of the batch
            assert positions == 2 * (length + step), (index, step, seen)
            assert ratio == pytest.approx(positions / capacity)
    rows_after_first_ended = [running for step, (running, _, _) in enumerate(seen[1]) if step > len(seen[0])]
    assert rows_after_first_ended and set(rows_after_first_ended) == {1.0}
    # /health's running count follows the rows still generating too (it reported the batch size until it ended)
    assert [h for step, h in enumerate(health[1]) if step > len(seen[0])] == [1] * len(rows_after_first_ended)
    assert scheduler.running == 0
    if len(seen[0]) == 2:  # both rows generating at the second step
        assert seen[1][1][0] == 2.0
    for name in ("vlmforge_requests_running", "vlmforge_kv_cache_positions", "vlmforge_kv_cache_usage_ratio"):
        assert metrics.registry.get_sample_value(name) == 0, name
