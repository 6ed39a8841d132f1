"""The serving scheduler: one thread takes queued requests in batches and decodes them together.

Requests come from the HTTP handlers (any thread, usually the event loop); each carries a
thread-safe sink its handler reads tokens from. The scheduler thread takes the first queued request,
waits up to ``batch_wait_s`` for more (never beyond ``max_batch_size``), and runs them as one batch:
an incremental engine's batch goes through :mod:`vlmforge.runner.jobs` (images encoded in one
visual-engine batch, prefixes, one decode step per token for all), a whole-request engine gets the
requests themselves (:mod:`vlmforge.runner.protocol`).

In-flight batching (``inflight``, on by default): at every step boundary of an incremental engine's batch the
scheduler takes the requests waiting (without blocking, up to ``max_batch_size`` live requests), encodes their images
in one visual-engine batch, and admits each into the running batch, where it takes a finished request's row or a new
one; they are prefilled together in one forward (up to ``max_prefill_tokens`` padded positions per boundary) and get
their first tokens with the next step. One that cannot join now (the batch's state has no room: encoder-
decoder and cross-attention LLMs take no joins) waits, in order, ahead of the queue, for the next boundary or batch.
With ``inflight`` off, requests that arrive while a batch decodes wait for the next batch (the behaviour before).
Whole-request engines (TensorRT-LLM) always batch at batch boundaries here: TensorRT-LLM's own executor does its
in-flight batching inside ``generate_many``.

With tensor parallelism the scheduler is rank 0's: it sends each batch to the other ranks before the first forward,
and the batch's steps keep them in lockstep (joiners included: they travel with the step). Idle, it sends heartbeats;
stopped, it finishes what is queued, then tells the other ranks to exit.
"""

from __future__ import annotations

import collections
import functools
import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vlmforge.runner.distributed import HEARTBEAT_SECONDS, ControlChannel, Heartbeat, Shutdown
from vlmforge.runner.jobs import BatchJob, JobRejected, WholeJob, encode_job, job_prefixes, lead_batch, split_job
from vlmforge.runner.protocol import EngineKind, IncrementalEngine, ServingEngine, WholeRequestEngine
from vlmforge.runner.sampling import SamplingParams, TokenLogprob

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Token:
    token: int
    logprob: TokenLogprob | None = None


@dataclass(frozen=True)
class Finished:
    reason: str
    """"stop" (end token or stop string), "length" (max_tokens) or "cancelled"."""


@dataclass(frozen=True)
class Failed:
    status: int
    message: str


Event = Token | Finished | Failed


class QueueFull(Exception):
    """The scheduler already holds its limit of waiting requests."""


class Draining(Exception):
    """The scheduler is stopping and takes no new requests."""


_ids = itertools.count(1)


class GenRequest:
    """One request's journey through the scheduler; ``sink`` receives its events from the scheduler thread."""

    def __init__(self, image: Any, prompt: str | None, max_new_tokens: int, prompt_tokens: int,
                 sink: Callable[[Event], None], sampling: SamplingParams | None = None) -> None:
        self.id = next(_ids)
        self.image = image
        """The request's image, or a list of its images (several per prompt), in order."""
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.sampling = sampling
        """How its tokens are picked (None: greedy)."""
        self.prompt_tokens = prompt_tokens
        """The server's count of its prompt positions (text and image features) before its images are encoded: exact
        where every image gives the same number of features, an upper bound otherwise (LLaVA-NeXT's anyres)."""
        self.prompt_positions: int | None = None
        """The positions its LLM prefix really has, once made (set before its first token): what usage reports."""
        self.sink = sink
        self.enqueued_at = time.perf_counter()
        self.started_at: float | None = None
        self.cancelled: str | None = None
        self.finished = False
        self._batch: Any = None
        self._row = -1
        self._lock = threading.Lock()
        self._on_done: Callable[[], None] | None = None

    def cancel(self, reason: str = "cancelled") -> None:
        """End this request early (stop string, lost client); safe from any thread."""
        with self._lock:
            self.cancelled = self.cancelled or reason
            if self._batch is not None:
                self._batch.cancel(self._row, reason)

    def _attach(self, batch: Any, row: int) -> None:
        with self._lock:
            self._batch, self._row = batch, row
            if self.cancelled:
                batch.cancel(row, self.cancelled)

    def _emit(self, event: Event) -> None:
        if self.finished:
            return
        if isinstance(event, Finished | Failed):
            self.finished = True
            if self._on_done is not None:
                self._on_done()
        try:
            self.sink(event)
        except Exception:
            log.debug("request %d: its sink is gone", self.id, exc_info=True)


class Scheduler:
    """Batches requests for one engine on a thread of its own."""

    def __init__(self, engine: ServingEngine, *, max_batch_size: int, max_queue: int = 256, batch_wait_s: float = 0.005,
                 channel: ControlChannel | None = None, metrics: Any = None,
                 warmup: Callable[[], None] | None = None, inflight: bool = True,
                 max_prefill_tokens: int | None = None, batched_joins: bool = True) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.batch_wait_s = batch_wait_s
        self.channel = channel
        self.metrics = metrics
        self.inflight = inflight
        """Requests join a running batch at its step boundaries (incremental engines); off: at batch boundaries."""
        self.max_prefill_tokens = max_prefill_tokens
        """Most padded prompt positions prefilled together at one step boundary (None: no bound but the batch size)."""
        self.batched_joins = batched_joins
        """A boundary's joiners are prefilled in one forward; False: one forward each (the behaviour before)."""
        self._queue: queue.Queue[GenRequest] = queue.Queue()
        self._held: collections.deque[GenRequest] = collections.deque()
        """Taken from the queue but not admitted (no room in the running batch): first in line, in order."""
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vlmforge-scheduler", daemon=True)
        self._warmup = warmup
        self.ready = threading.Event()
        """Set once the warm-up (compiling the decode step's buckets, in this thread) is done."""
        self.running = 0
        self.batches = 0
        self._in_flight = 0
        self._count_lock = threading.Lock()
        self.error: BaseException | None = None
        self._execute: Callable[[list[GenRequest]], None]
        if engine.kind is EngineKind.WHOLE_REQUEST:
            self._execute = self._run_whole
        else:
            self._execute = self._run_incremental

    # --- the HTTP side ----------------------------------------------------------------------

    def submit(self, request: GenRequest) -> None:
        if self._stopping.is_set():
            raise Draining("the runner is shutting down")
        if self.error is not None:
            raise Draining("the runner failed and is not serving")
        if self._queue.qsize() >= self.max_queue:
            raise QueueFull(f"{self._queue.qsize()} requests are already waiting (the limit is {self.max_queue})")
        with self._count_lock:
            self._in_flight += 1
        request._on_done = self._done
        self._queue.put(request)
        if self.error is not None:  # the thread failed meanwhile and drained before this put: nobody will take it
            for stranded in self._drain_queue():
                stranded._emit(Failed(503, "the runner failed and is not serving"))
        if self.metrics:
            self.metrics.queue_depth.set(self.waiting)

    @property
    def waiting(self) -> int:
        return self._queue.qsize() + len(self._held)

    @property
    def in_flight(self) -> int:
        """Requests taken and not finished yet (waiting, being batched or decoding)."""
        return self._in_flight

    def _done(self) -> None:
        with self._count_lock:
            self._in_flight -= 1

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Take no new requests, finish the queued ones, release the other ranks, and wait for the thread."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # --- the scheduler thread -----------------------------------------------------------------

    def _next_batch(self) -> list[GenRequest]:
        batch = []
        while self._held and len(batch) < self.max_batch_size:  # those a running batch had no room for come first
            batch.append(self._held.popleft())
        if not batch:
            try:
                batch.append(self._queue.get(timeout=0.1 if self._stopping.is_set() else 0.5))
            except queue.Empty:
                return []
        deadline = time.perf_counter() + self.batch_wait_s
        while len(batch) < self.max_batch_size:
            remaining = deadline - time.perf_counter()
            try:
                batch.append(self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _run(self) -> None:
        idle_since = time.monotonic()
        try:
            if self._warmup is not None:  # before the first request is taken: compiling takes a while
                started = time.perf_counter()
                self._warmup()
                log.info("warmed up in %.1fs", time.perf_counter() - started)
            self.ready.set()
            while True:
                batch = self._next_batch()
                if self.metrics:
                    self.metrics.queue_depth.set(self.waiting)
                if not batch:
                    if self._stopping.is_set():
                        break
                    if self.channel is not None and time.monotonic() - idle_since > HEARTBEAT_SECONDS:
                        self.channel.send(Heartbeat())
                        idle_since = time.monotonic()
                    continue
                self._run_batch(batch)
                idle_since = time.monotonic()
        except BaseException as exc:
            self.error = exc
            log.exception("the scheduler stopped")
            for request in self._drain_queue():
                request._emit(Failed(503, "the runner failed and is not serving"))
            if self.metrics:
                self.metrics.queue_depth.set(0)
            if self.channel is not None:
                # the other ranks may be anywhere in a batch: no clean way on; end the whole job
                log.critical("rank 0 cannot keep the other ranks in step: exiting")
                os._exit(1)
            return
        if self.channel is not None:
            self.channel.send(Shutdown("rank 0 drained its requests"))
        log.info("scheduler stopped after %d batches", self.batches)

    def _drain_queue(self) -> list[GenRequest]:
        out = list(self._held)
        self._held.clear()
        while True:
            try:
                out.append(self._queue.get_nowait())
            except queue.Empty:
                return out

    def _run_batch(self, requests: list[GenRequest]) -> None:
        live = []
        for request in requests:
            if request.cancelled:
                request._emit(Finished("cancelled"))
            else:
                live.append(request)
        if not live:
            return
        started = time.perf_counter()
        for request in live:
            request.started_at = started
        if self.metrics:
            self.metrics.batch_size.observe(len(live))
        self.running = len(live)
        if self.metrics:
            self.metrics.running.set(len(live))
        try:
            self._execute(live)
        finally:
            self.running = 0
            if self.metrics:
                self.metrics.batch_ended()
        self.batches += 1
        log.debug("batch of %d in %.3fs", len(live), time.perf_counter() - started)

    def _fail(self, live: list[GenRequest], status: int, message: str) -> None:
        for request in live:
            request._emit(Failed(status, message))

    def _encode(self, engine: IncrementalEngine, requests: list[GenRequest], what: str) -> BatchJob | None:
        """The requests' images through the visual engine in one batch; on failure they fail with 500 (None)."""
        try:
            return encode_job(engine, [r.image for r in requests], [r.prompt for r in requests],
                              [r.max_new_tokens for r in requests])
        except Exception as exc:
            log.exception("visual engine failed on %s", what)
            self._fail(requests, 500, f"the visual engine failed: {type(exc).__name__}: {exc}")
            return None

    def _run_incremental(self, live: list[GenRequest]) -> None:
        """An incremental engine's batch: encoded, sent to the other ranks, decoded one step per token for all."""
        engine: IncrementalEngine = self.engine  # type: ignore[assignment]  # chosen by kind in __init__
        job = self._encode(engine, live, f"a batch of {len(live)}")
        if job is None:
            return
        if self.channel is not None:
            self.channel.send(job.to_host())
        try:
            batch = lead_batch(engine, job, sync=self.channel, sampling=[r.sampling for r in live],
                               capacity=self.max_batch_size, max_prefill_tokens=self.max_prefill_tokens,
                               batched_joins=self.batched_joins)
        except JobRejected as exc:  # the followers fail the same way and skip this batch too
            self._fail(live, 400, str(exc))
            return
        except Exception as exc:
            log.exception("a batch of %d could not start", len(live))
            self._fail(live, 500, f"decoding failed: {type(exc).__name__}: {exc}")
            if self.channel is not None:
                raise  # the followers wait for steps that will not come: _run ends the job
            return
        members = list(live)  # by request number in the batch (admission order): joiners are appended
        for row, request in enumerate(members):
            request._attach(batch, row)
        try:
            for events in batch:
                for event in events:
                    request = members[event.row]
                    if request.prompt_positions is None:  # its first token: its prefix is made
                        request.prompt_positions = batch.prefixes[event.row].length
                    request._emit(Token(event.token, event.logprob))
                    if event.finish is not None:
                        request._emit(Finished(event.finish))
                for seq, why in batch.rejected.items():  # a joiner's prompt refused (tensor parallelism)
                    members[seq]._emit(Failed(400, why))
                if self.inflight:
                    self._admit(engine, batch, members)
                self.running = sum(finish is None for finish in batch.finish)  # rows still generating
                if self.metrics:
                    self.metrics.observe_step(batch)
        except Exception as exc:
            log.exception("decoding failed in a batch of %d", len(members))
            self._fail([r for r in members if not r.finished], 500, f"decoding failed: {type(exc).__name__}: {exc}")
            if self.channel is not None:
                raise  # the ranks are out of step: _run ends the job
            return
        for row, request in enumerate(members):
            if not request.finished:
                request._emit(Finished(batch.finish[row] or "cancelled"))
        if self.metrics:
            self.metrics.decode_steps.inc(batch.steps)

    def _admit(self, engine: IncrementalEngine, batch: Any, members: list[GenRequest]) -> None:
        """At a step boundary: the waiting requests the running batch has room for, encoded together and admitted in
        order; the first that cannot join waits, with those after it, ahead of the queue."""
        candidates: list[GenRequest] = []
        room = self.max_batch_size - sum(f is None for f in batch.finish)
        while len(candidates) < room:
            if self._held:
                request = self._held.popleft()
            else:
                try:
                    request = self._queue.get_nowait()
                except queue.Empty:
                    break
            if request.cancelled:
                request._emit(Finished("cancelled"))
                continue
            if not batch.has_room(request.prompt_tokens, request.max_new_tokens, [c.prompt_tokens for c in candidates]):
                self._held.appendleft(request)
                break
            candidates.append(request)
        if not candidates:
            return
        job = self._encode(engine, candidates, f"{len(candidates)} joining requests")
        if job is None:
            return
        started = time.perf_counter()
        for index, (request, one) in enumerate(zip(candidates, split_job(job), strict=True)):
            if self.channel is not None:  # made after the step message, as the followers make it (a collective)
                prefix: Any = functools.partial(lambda one: job_prefixes(engine, one)[0], one)
            else:
                try:
                    prefix = job_prefixes(engine, one)[0]
                except JobRejected as exc:
                    request._emit(Failed(400, str(exc)))
                    continue
            payload = one.to_host() if self.channel is not None else None
            try:
                seq = batch.admit(prefix, request.max_new_tokens, request.sampling, payload=payload,
                                  length=request.prompt_tokens)
            except Exception as exc:  # the batch's state may be broken: these fail here, the batch's rows by the caller
                self._fail(candidates[index:], 500, f"decoding failed: {type(exc).__name__}: {exc}")
                raise
            if seq is None:  # the state had room for its announced length but not for this prefix: wait, in order
                self._held.extendleft(reversed(candidates[index:]))
                break
            assert seq == len(members), "requests are numbered in admission order"
            members.append(request)
            request.started_at = started
            request._attach(batch, seq)
        if self.metrics:
            self.metrics.queue_depth.set(self.waiting)

    def _run_whole(self, live: list[GenRequest]) -> None:
        """A whole-request engine (TensorRT-LLM's multimodal runner): every rank runs the same calls; rank 0's
        tokens go out as the engine streams them, the rest when each request is done."""
        engine: WholeRequestEngine = self.engine  # type: ignore[assignment]  # chosen by kind in __init__
        images, prompts, limits = [r.image for r in live], [r.prompt for r in live], [r.max_new_tokens for r in live]
        if self.channel is not None:
            self.channel.send(WholeJob(images, prompts, limits, [r.sampling for r in live]))
        sent = [0] * len(live)

        def on_token(index: int, token: int) -> None:
            sent[index] += 1
            live[index]._emit(Token(token))

        try:
            results = engine.generate_many(images, prompts, limits, on_token=on_token,
                                           sampling=[r.sampling for r in live])
        except Exception as exc:
            log.exception("generation failed in a batch of %d", len(live))
            self._fail(live, 500, f"generation failed: {type(exc).__name__}: {exc}")
            if self.channel is not None:
                raise
            return
        for index, (request, result) in enumerate(zip(live, results)):
            for token in result.tokens[sent[index]:]:  # what was not streamed (encoder-decoder LLMs)
                request._emit(Token(token))
            request._emit(Finished("length" if len(result.tokens) >= request.max_new_tokens else "stop"))
