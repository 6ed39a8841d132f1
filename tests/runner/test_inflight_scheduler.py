"""In-flight batching in the scheduler, with the real tiny-llava engine: a request arriving while a long one decodes
joins it and gets its first token before the long one ends; waiting requests beyond the batch's capacity, or that
the batch has no room for, keep their order and are all answered; with inflight off, the batch-boundary behaviour of
before. Event order, not timing: the arrivals are made from the long request's own token events."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from vlmforge.runner.sampling import SamplingParams
from vlmforge.runner.scheduler import Failed, Finished, GenRequest, Scheduler, Token

LONG = SamplingParams(ignore_eos=True)  # still plain greedy: runs to its limit even if random weights say eos
PROMPTS = ["What is this?", "Describe the picture of two dogs playing in the snow near a tree, please.", "A photo of",
           "Question: which city is this? Answer:", "What?"]


@pytest.fixture(scope="module")
def engine(tiny_engine: Path) -> Any:
    from vlmforge.runner.engine import HfEngine

    return HfEngine(tiny_engine)


def image(index: int) -> Image.Image:
    return Image.new("RGB", (40, 40), (10 + 40 * index, 200 - 30 * index, 30 + 20 * index))


class Log:
    """Every request's events, in the order the scheduler emitted them (one list for all)."""

    def __init__(self, expected: int) -> None:
        self.events: list[tuple[str, Any]] = []
        self.tokens: dict[str, list[int]] = {}
        self.ended = threading.Semaphore(0)
        self.expected = expected
        self.hooks: dict[tuple[str, int], Any] = {}

    def sink(self, name: str) -> Any:
        self.tokens[name] = []

        def put(event: Any) -> None:
            self.events.append((name, event))
            if isinstance(event, Token):
                self.tokens[name].append(event.token)
                hook = self.hooks.pop((name, len(self.tokens[name])), None)
                if hook is not None:
                    hook()
            if isinstance(event, Finished | Failed):
                self.ended.release()
        return put

    def wait(self) -> None:
        for _ in range(self.expected):
            assert self.ended.acquire(timeout=120), self.events

    def first_token(self, name: str) -> int:
        return next(i for i, (n, e) in enumerate(self.events) if n == name and isinstance(e, Token))

    def end(self, name: str) -> int:
        return next(i for i, (n, e) in enumerate(self.events) if n == name and isinstance(e, Finished | Failed))


def request(engine: Any, log: Log, name: str, index: int, limit: int, sampling: SamplingParams | None = None
            ) -> GenRequest:
    prompt = PROMPTS[index % len(PROMPTS)]
    return GenRequest(image(index), prompt, limit, engine.prompt_length(prompt), log.sink(name), sampling=sampling)


def alone(engine: Any, index: int, limit: int) -> list[int]:
    return engine.generate_batch([image(index)], [PROMPTS[index % len(PROMPTS)]], limit)[0].tokens


def run(engine: Any, *, inflight: bool, capacity: int, joiners: list[tuple[str, int, int]], at: int = 2,
        metrics: Any = None, cancelled: tuple[str, int, int] | None = None, **options: Any) -> tuple[Log, Scheduler]:
    """A long request (24 tokens); at its ``at``-th token the ``joiners`` (name, image/prompt index, limit) are
    submitted, from the scheduler thread itself (so they arrive mid-batch, deterministically); ``cancelled`` is
    submitted first and cancelled at once (it waits in the queue when it is cancelled)."""
    scheduler = Scheduler(engine, max_batch_size=capacity, inflight=inflight, metrics=metrics, **options)
    log = Log(1 + len(joiners) + (cancelled is not None))
    made = [request(engine, log, name, index, limit) for name, index, limit in joiners]
    gone = request(engine, log, *cancelled) if cancelled is not None else None

    def arrive() -> None:
        if gone is not None:
            scheduler.submit(gone)
            gone.cancel()
        for r in made:
            scheduler.submit(r)

    log.hooks[("long", at)] = arrive
    scheduler.submit(request(engine, log, "long", 0, 24, LONG))
    scheduler.start()
    try:
        log.wait()
    finally:
        scheduler.stop(30)
    return log, scheduler


def test_a_request_arriving_mid_batch_gets_its_first_token_before_the_long_one_ends(engine: Any) -> None:
    from vlmforge.runner.metrics import Metrics

    metrics = Metrics("tiny", "dir", 1)
    log, scheduler = run(engine, inflight=True, capacity=4, joiners=[("short", 1, 5)], metrics=metrics)
    assert log.first_token("short") < log.end("long")
    assert log.tokens["long"][:len(want := alone(engine, 0, 24))] == want
    assert log.tokens["short"] == alone(engine, 1, 5)
    assert scheduler.batches == 1
    for name in ("vlmforge_requests_running", "vlmforge_queue_depth"):
        assert metrics.registry.get_sample_value(name) == 0, name


def test_without_inflight_the_request_waits_for_the_running_batch(engine: Any) -> None:
    log, scheduler = run(engine, inflight=False, capacity=4, joiners=[("short", 1, 5)])
    assert log.first_token("short") > log.end("long")
    assert log.tokens["short"] == alone(engine, 1, 5)
    assert scheduler.batches == 2


def test_waiting_requests_beyond_capacity_join_in_order_as_rows_free_up(engine: Any) -> None:
    """Capacity 2: one joiner at a time beside the long request, each into the row the one before left; order kept,
    nothing lost, each with its lone tokens; a request cancelled while it waits ends without a row."""
    joiners = [("a", 1, 3), ("b", 2, 4), ("c", 3, 2), ("d", 4, 3)]
    log, scheduler = run(engine, inflight=True, capacity=2, joiners=joiners, cancelled=("gone", 2, 4))
    firsts = [log.first_token(name) for name, _, _ in joiners]
    assert firsts == sorted(firsts)
    for (name, index, limit), before in zip(joiners[1:], joiners):
        assert log.first_token(name) > log.end(before[0]), "capacity 2: the next joins when the one before ends"
    assert log.end("d") < log.end("long") and scheduler.batches == 1
    for name, index, limit in joiners:
        assert log.tokens[name] == alone(engine, index, limit), name
    assert log.tokens["gone"] == [] and ("gone", Finished("cancelled")) in log.events


def test_a_request_the_batch_has_no_room_for_waits_with_those_behind_it(engine: Any,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A state that cannot take the long prompt now (as the static path's full bucket, or T5 always): that request
    and the one behind it wait for the next batch, in order; the rest of the batch runs on."""
    from vlmforge.runner.states import DecoderOnlyBatch

    limit = engine.prompt_length(PROMPTS[1])
    room = DecoderOnlyBatch.room
    monkeypatch.setattr(DecoderOnlyBatch, "room",
                        lambda self, length, new, claimed=0: None if length >= limit
                        else room(self, length, new, claimed))
    log, scheduler = run(engine, inflight=True, capacity=4, joiners=[("wide", 1, 4), ("next", 2, 3)])
    assert log.first_token("wide") > log.end("long") and log.first_token("next") > log.first_token("wide") - 2
    assert log.first_token("next") > log.end("long"), "no overtaking the request that waits"
    assert log.tokens["wide"] == alone(engine, 1, 4) and log.tokens["next"] == alone(engine, 2, 3)
    assert scheduler.batches == 2 and scheduler.waiting == 0


@pytest.mark.parametrize("cap", [None, "two"])
def test_requests_arriving_together_are_prefilled_in_one_forward(engine: Any, cap: str | None) -> None:
    """Three requests of three prompt lengths arrive at one boundary: one prefill forward of three rows (with
    max_prefill_tokens fitting two of them: two, then the third at the next boundary), each with its lone tokens."""
    from tests.runner.test_inflight import Prefills

    joiners = [("a", 1, 5), ("b", 2, 4), ("c", 3, 6)]
    lengths = [engine.prompt_length(PROMPTS[i]) for _, i, _ in joiners]
    assert len(set(lengths)) == 3
    options = {"max_prefill_tokens": 2 * max(lengths[:2])} if cap else {}
    with Prefills(engine.llm) as prefills:
        log, scheduler = run(engine, inflight=True, capacity=4, joiners=joiners, **options)
    assert prefills.sizes == ([1, 2, 1] if cap else [1, 3])
    for name, index, limit in joiners:
        assert log.tokens[name] == alone(engine, index, limit), name
    assert log.tokens["long"][:len(want := alone(engine, 0, 24))] == want and scheduler.batches == 1
