"""Engines that take whole requests (TensorRT-LLM's multimodal runner): the scheduler streams the tokens they
hand over while a request runs and sends the rest when it is done."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import torch

from vlmforge.runner.protocol import EngineKind, Generation
from vlmforge.runner.sampling import SamplingParams
from vlmforge.runner.scheduler import Draining, Finished, GenRequest, Scheduler, Token


class WholeEngine:
    """Request 0 streams its tokens (a decoder-only LLM); request 1 does not (an encoder-decoder one)."""

    kind = EngineKind.WHOLE_REQUEST

    def __init__(self, events: dict[int, list[Any]]) -> None:
        self.events = events
        self.live_checks: list[bool] = []

    def generate_many(self, images: list[Any], prompts: list[str | None], max_new_tokens: list[int],
                      on_token: Any = None, sampling: Any = None) -> list[Generation]:
        self.sampling = sampling
        results = []
        for index, image in enumerate(images):
            tokens = [1, 2, 3] if image == "decoder" else [7, 8]
            if image == "decoder" and on_token is not None:
                for token in tokens:
                    on_token(index, token)
                    self.live_checks.append(self.events[index][-1] == Token(token))  # out before the request ends
            results.append(Generation(tokens=tokens, text="", logits=torch.empty(0), vision_ms=0.0, llm_ms=0.0))
        return results


def test_tokens_stream_while_a_whole_request_runs_and_the_rest_follow_at_its_end() -> None:
    events: dict[int, list[Any]] = {0: [], 1: []}
    done = threading.Semaphore(0)

    def sink(index: int) -> Any:
        def put(event: Any) -> None:
            events[index].append(event)
            if isinstance(event, Finished):
                done.release()
        return put

    engine = WholeEngine(events)
    scheduler = Scheduler(engine, max_batch_size=2, batch_wait_s=0.2)
    scheduler.start()
    scheduler.submit(GenRequest("decoder", "a", 5, 1, sink(0)))
    seeded = SamplingParams(temperature=0.5, seed=3)
    scheduler.submit(GenRequest("encoder-decoder", "b", 2, 1, sink(1), sampling=seeded))
    assert done.acquire(timeout=10) and done.acquire(timeout=10)
    assert engine.sampling == [None, seeded], "each request's sampling parameters reach the engine"
    scheduler.stop(timeout=10)
    assert events[0] == [Token(1), Token(2), Token(3), Finished("stop")]
    assert events[1] == [Token(7), Token(8), Finished("length")]
    assert engine.live_checks == [True, True, True]
    assert scheduler.batches == 1


def test_a_scheduler_that_failed_refuses_new_requests_instead_of_queueing_them() -> None:
    def warmup() -> None:
        raise RuntimeError("the decode step did not compile")

    scheduler = Scheduler(WholeEngine({}), max_batch_size=1, warmup=warmup)
    scheduler.start()
    deadline = time.monotonic() + 10
    while scheduler.alive and time.monotonic() < deadline:
        time.sleep(0.05)
    assert isinstance(scheduler.error, RuntimeError) and not scheduler.alive
    with pytest.raises(Draining, match="failed"):
        scheduler.submit(GenRequest("decoder", "a", 1, 1, lambda event: None))


def test_a_failed_scheduler_fails_its_queue_and_the_queue_gauge_reads_zero() -> None:
    """The queued requests get 503 when the scheduler fails; vlmforge_queue_depth read 2 ever after until the fix."""
    from vlmforge.runner.metrics import Metrics

    release = threading.Event()

    def warmup() -> None:
        release.wait(10)
        raise RuntimeError("the decode step did not compile")

    metrics = Metrics("m", "e", 1)
    scheduler = Scheduler(WholeEngine({}), max_batch_size=1, warmup=warmup, metrics=metrics)
    scheduler.start()
    failed: list[Any] = []
    for prompt in ("a", "b"):
        scheduler.submit(GenRequest("decoder", prompt, 1, 1, failed.append))
    assert metrics.registry.get_sample_value("vlmforge_queue_depth") == 2
    release.set()
    scheduler.stop(timeout=10)  # joins the thread: its failure handling is over
    assert isinstance(scheduler.error, RuntimeError)
    assert [event.status for event in failed] == [503, 503]
    assert metrics.registry.get_sample_value("vlmforge_queue_depth") == 0
