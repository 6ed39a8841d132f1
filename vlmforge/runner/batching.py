"""Batched decoding: many requests through one LLM forward per step, greedy or sampled per row, requests joining
at step boundaries (in-flight batching).

Every request arrives as a :class:`~vlmforge.modeling.LlmPrefix` (what its family feeds the LLM); a batch state
(:mod:`vlmforge.runner.states`, or the static GPU path of :mod:`vlmforge.runner.static`) pads them to one shape and
decodes them together. Greedy tokens of each request equal those of the unbatched loops (``family.generate``),
whether it started the batch or joined it mid-way; the tests check it.

Rows with sampling parameters (:mod:`vlmforge.runner.sampling`) are picked by a :class:`BatchSampler`, each
with its own generator; a batch of plain greedy rows never builds one and takes the argmax as it always did.
A finished request's row (end token, its own token limit, or cancelled by the server) is retired: fed a pad token,
its outputs ignored, until a joining request reuses it.

In-flight batching: between two steps the consumer may :meth:`GreedyBatch.admit` new requests (up to ``capacity``
live ones, and up to ``max_prefill_tokens`` padded prompt positions per boundary): the requests admitted at one
boundary are prefilled together in one left-padded forward (``batched_joins``; off: one forward each, the behaviour
before) once the consumer resumes the iteration, and placed in retired rows or new ones; their first tokens come with
the next step's events. Decoder-only LLMs take joins; encoder-decoder and cross-attention batches do not (``room`` is
None: their requests wait for the next batch).

Under tensor parallelism every rank runs the same forwards: rank 0 picks the tokens and sends them, with the rows
retired and the requests joined at that boundary (:class:`Changes`), through a :class:`StepSync`; the other ranks
run :func:`follow_batch`, which applies the same step, retires and joins in the same order (batched as rank 0
batched them: a prefill is a collective under tensor parallelism).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from vlmforge.modeling.devices import model_device
from vlmforge.modeling.generation import GenResult, LlmPrefix
from vlmforge.runner.sampling import BatchSampler, SamplingParams, TokenLogprob, needs_sampler
from vlmforge.runner.sequences import PendingPrefix, RowEvent, Sequences
from vlmforge.runner.states import (  # noqa: F401 - re-exported: the batch states lived here before
    BATCH_KINDS,
    CrossAttnBatch,
    DecoderOnlyBatch,
    PrefixBatch,
    Seq2SeqBatch,
    _last_logits_only,
    _stack,
    make_batch,
)

__all__ = ["BatchFactory", "Changes", "GreedyBatch", "PrefixBatch", "RowEvent", "StepSource", "StepSync",
           "follow_batch", "greedy_batch", "make_batch"]


class BatchFactory(Protocol):
    """Makes the batch state for prefixes that will generate up to ``max_new_tokens`` (e.g. the static-cache
    path of :mod:`vlmforge.runner.static`)."""

    def __call__(self, prefixes: Sequence[LlmPrefix], max_new_tokens: int) -> PrefixBatch: ...


@dataclass(frozen=True)
class Changes:
    """What changed at a step boundary besides the tokens (tensor parallelism: rank 0 tells the followers, who apply
    the same changes in the same order: the step, then ``retired``, then each joiner at ``room``'s row)."""

    retired: tuple[int, ...] = ()
    """Rows whose requests ended, in the order they were retired."""
    joined: tuple[Any, ...] = ()
    """The joiners in admission order: rank 0 sends what ``admit`` got as ``payload`` (the scheduler: each joiner's
    host :class:`~vlmforge.runner.jobs.BatchJob`); a follower's :class:`StepSource` hands them back as
    ``(LlmPrefix, max_new_tokens)`` pairs."""
    batched: bool = True
    """The joiners were prefilled in one forward (False: one forward each, in order); followers do the same."""


class StepSync(Protocol):
    """Rank 0's side of the lockstep: at every step boundary, the tokens fed next, whether to go on, and what else
    changed (rows retired and joined; None: nothing)."""

    def step(self, tokens: torch.Tensor, go_on: bool, changes: Changes | None = None) -> None: ...


class StepSource(Protocol):
    """A follower's side: rank 0's tokens, decision and changes, for a batch of ``size`` rows."""

    def step(self, size: int) -> tuple[torch.Tensor, bool, Changes | None]: ...


class _HostCopy:
    """A device tensor on its way to the host: copied without blocking, waited for when read."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.event = None
        if tensor.device.type == "cuda":
            self.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self.host.copy_(tensor, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = tensor

    def tolist(self) -> list[Any]:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


class GreedyBatch:
    """A batch's decode, one step per iteration: ``for events in batch: ...``; greedy unless ``sampling`` gives a
    row other parameters (one :class:`SamplingParams` or None per row).

    ``cancel(row, reason)`` ends a request at the next step (the server's stop strings and lost clients). With
    ``keep_logits`` each request's raw float32 logits are kept (validation and tests; a server does not need them).

    In-flight batching: while the iteration is suspended at its yield (a step boundary), :meth:`admit` lets a new
    request join, up to ``capacity`` live requests; its first token comes with the next events. Requests are numbered
    in admission order (:mod:`vlmforge.runner.sequences`); the batch ends when every request has and none joined.
    """

    def __init__(self, llm: torch.nn.Module, prefixes: Sequence[LlmPrefix], max_new_tokens: Sequence[int], *,
                 keep_logits: bool = False, sync: StepSync | None = None, pad_token_id: int = 0,
                 factory: BatchFactory | None = None,
                 sampling: Sequence[SamplingParams | None] | None = None, capacity: int | None = None,
                 max_prefill_tokens: int | None = None, batched_joins: bool = True) -> None:
        if len(max_new_tokens) != len(prefixes):
            raise ValueError(f"{len(prefixes)} prefixes but {len(max_new_tokens)} token limits")
        if any(n < 1 for n in max_new_tokens):
            raise ValueError(f"every max_new_tokens must be at least 1, got {list(max_new_tokens)}")
        if sampling is not None and len(sampling) != len(prefixes):
            raise ValueError(f"{len(prefixes)} prefixes but {len(sampling)} sampling parameter sets")
        self.llm = llm
        self.keep_logits = keep_logits
        self.sync = sync
        self.pad = pad_token_id
        self.factory = factory
        self.capacity = capacity
        """Most live requests at once (the scheduler's max_batch_size); None: no bound beyond the state's."""
        self.max_prefill_tokens = max_prefill_tokens
        """Most padded prompt positions (joiners x the longest joiner's length) prefilled together at one boundary; the
        first joiner of a boundary is taken whatever its length. None: no bound beyond ``capacity``."""
        self.batched_joins = batched_joins
        """A boundary's joiners are prefilled in one forward; False: one forward each (the behaviour before)."""
        self.seqs = Sequences(prefixes, max_new_tokens, sampling)
        self._sampled = needs_sampler(sampling)
        self._cancelled: dict[int, str] = {}
        self._state: PrefixBatch | None = None
        self._sampler: BatchSampler | None = None
        self._boundary = False
        self._joined: list[tuple[int, torch.Tensor]] = []  # (row, first-token logits) joined at this boundary
        self._queued: list[tuple[int, Any, Any]] = []  # (request, payload, prefix maker) joining after this boundary
        self.rejected: dict[int, str] = {}
        """Requests whose prefix could not be made (lockstep mode), and why."""
        self.steps = 0

    # per request, in admission order (what the metrics hook and the scheduler read)
    @property
    def prefixes(self) -> list[LlmPrefix | PendingPrefix]:
        return self.seqs.prefixes

    @property
    def limits(self) -> list[int]:
        return self.seqs.limits

    @property
    def tokens(self) -> list[list[int]]:
        return self.seqs.tokens

    @property
    def logits(self) -> list[list[torch.Tensor]]:
        return self.seqs.logits

    @property
    def finish(self) -> list[str | None]:
        return self.seqs.finish

    @property
    def kv_positions(self) -> int:
        """KV cache positions the batch holds: the state's count (rows x columns of the eager cache, after joins and
        trims), else rows x (longest prompt + steps)."""
        held = self._state.kv_positions() if self._state is not None else None
        if held is not None:
            return held
        return len(self.prefixes) * (max(p.length for p in self.prefixes) + self.steps)

    def cancel(self, row: int, reason: str) -> None:
        """End request ``row`` before its next token (safe to call from another thread)."""
        self._cancelled.setdefault(row, reason)

    @property
    def done(self) -> bool:
        return all(f is not None for f in self.finish)

    def _fits(self, length: int, max_new_tokens: int, ahead: Sequence[int]) -> bool:
        """Whether a joiner of ``length`` positions fits after this boundary's queued joiners and ``ahead`` (lengths
        of others the caller will admit first): a live request under ``capacity``, a row of the state, and the padded
        prompt positions of the boundary's prefill under ``max_prefill_tokens``."""
        assert self._state is not None
        before = [self.seqs.prefixes[seq].length for seq, _, _ in self._queued] + list(ahead)
        if self.capacity is not None and self.seqs.live + len(ahead) >= self.capacity:
            return False
        if self.max_prefill_tokens is not None and before and self.batched_joins:
            if (len(before) + 1) * max(length, *before) > self.max_prefill_tokens:
                return False
        return self._state.room(length, max_new_tokens, len(before)) is not None

    @torch.no_grad()
    def has_room(self, length: int, max_new_tokens: int, ahead: Sequence[int] = ()) -> bool:
        """Whether a request of ``length`` prompt positions could join at this boundary after the requests of
        lengths ``ahead`` (checked before its images are encoded: a batch that cannot take it leaves it waiting,
        unencoded)."""
        return self._state is not None and self._fits(length, max_new_tokens, ahead)

    @torch.no_grad()  # called between iterations: outside the iteration's own no_grad
    def admit(self, prefix: LlmPrefix | Callable[[], LlmPrefix], max_new_tokens: int,
              sampling: SamplingParams | None = None, *, payload: Any = None, length: int | None = None) -> int | None:
        """At a step boundary (while the iteration is suspended at its yield): let ``prefix`` join; its request
        number, or None when it cannot join now (the batch is at ``capacity``, the boundary's prefill at
        ``max_prefill_tokens``, or the state has no room: keep it for a later boundary or the next batch). The
        boundary's joiners are prefilled when the iteration resumes (after the boundary's step where there is a
        StepSync; without one the next step is already launched: its logits for their rows are replaced). With a
        StepSync (tensor parallelism) ``payload`` is what the followers are sent for it, and ``prefix`` may be a
        callable (with ``length``, its prompt positions) called only after the followers have been told, since
        building a prefix runs the LLM's (sharded) embedding, a collective every rank must enter in the same order.
        A callable that raises ValueError ends the request with finish "rejected" (:attr:`rejected` says why)."""
        if not self._boundary or self._state is None:
            raise RuntimeError("admit is only possible at a step boundary (while the batch's iteration is suspended)")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if callable(prefix) and (self.sync is None or length is None):
            raise ValueError("a prefix to be made later needs a StepSync and its length")
        if not self._fits((length or 0) if callable(prefix) else prefix.length, max_new_tokens, ()):
            return None
        if callable(prefix):
            seq = self.seqs.add(PendingPrefix(length or 0), max_new_tokens, sampling)  # made after the message
        else:
            seq = self.seqs.add(prefix, max_new_tokens, sampling)
        self._queued.append((seq, payload, prefix if callable(prefix) else None))
        if self.sync is None and not self.batched_joins:  # one forward each, at once (the behaviour before)
            self._join_queued()
        return seq

    def _join_queued(self) -> None:
        """Prefill the queued joiners (those not rejected) and place them: in one forward, or one each."""
        assert self._state is not None
        state, queued, self._queued = self._state, self._queued, []
        seqs = [seq for seq, _, _ in queued if seq not in self.rejected]
        if not seqs:
            return
        for group in [seqs] if self.batched_joins else [[seq] for seq in seqs]:
            joins = []
            for claimed, seq in enumerate(group):
                row = state.room(self.seqs.prefixes[seq].length, self.seqs.limits[seq], claimed)
                if row is None:
                    raise RuntimeError(f"the batch state refused request {seq} after admitting it")
                joins.append((row, self.seqs.prefixes[seq]))
            for seq, (row, _), logits in zip(group, joins, state.join_many(joins), strict=True):
                self.seqs.place(seq, row)
                params = self.seqs.sampling[seq]
                if self._sampler is None and params is not None and not params.plain_greedy:  # the first sampled row
                    rows = len(self.seqs.at_row)
                    self._sampler = BatchSampler([None] * rows, [frozenset()] * rows, logits.device)
                if self._sampler is not None:
                    self._sampler.place(row, params, self.seqs.prefixes[seq].eos)
                self._joined.append((row, logits))

    def _pending(self, upcoming: torch.Tensor | None) -> torch.Tensor:
        """The logits of the next pick: ``upcoming`` (the step's), the joiners' rows replaced (or added)."""
        assert self._state is not None
        joined, self._joined = self._joined, []
        if not joined:
            assert upcoming is not None, "a request went on past its token limit"
            return upcoming
        first = joined[0][1]
        size = self._state.size
        if upcoming is None:
            merged = first.new_zeros((size, first.shape[-1]))
        else:
            dtype = torch.promote_types(upcoming.dtype, first.dtype)
            extra = upcoming.new_zeros((size - upcoming.shape[0], upcoming.shape[1]), dtype=dtype)
            merged = torch.cat([upcoming.to(dtype), extra])
        for row, logits in joined:
            merged[row] = logits.to(merged.dtype)
        return merged

    def _retire(self) -> list[int]:
        assert self._state is not None
        rows = self.seqs.to_retire()
        for row in rows:
            self._state.retire(row)
        return rows

    def _pick(self, logits: torch.Tensor) -> tuple[torch.Tensor, list[TokenLogprob | None] | None]:
        if self._sampler is None:
            return logits.argmax(-1), None
        return self._sampler.step(logits)

    @torch.no_grad()
    def __iter__(self) -> Iterator[list[RowEvent]]:
        prefixes = list(self.seqs.prefixes)
        if self.factory is not None:
            state = self.factory(prefixes, max(self.seqs.limits))
        else:
            state = make_batch(self.llm, prefixes)
        self._state = state
        logits = state.prefill()
        if self._sampled:
            self._sampler = BatchSampler(self.seqs.sampling, [p.eos for p in prefixes], logits.device)
        # Without followers to tell (no tensor parallelism), the next step is fed this step's tokens straight
        # from the device and launched before they are read back: the GPU runs step t+1 while the host turns
        # step t into events. Finished rows are then fed their own pick instead of a pad token (their outputs
        # are dropped either way; rows do not see each other), and a batch ended by an end token or a cancel
        # has run one step too many.
        ahead = self.sync is None
        while True:
            picked, logprobs = self._pick(logits)
            host_tokens = _HostCopy(picked)
            host_logits = logits.float().cpu() if self.keep_logits else None
            upcoming = state.step(picked) if ahead and self.seqs.wants_more(self._cancelled) else None
            host = host_tokens.tolist()
            events = []
            for row, token in enumerate(host):
                event = self.seqs.record(row, token, self._cancelled, None if host_logits is None else host_logits[row],
                                         logprobs[row] if logprobs else None)
                if event is not None:
                    events.append(event)
            self.steps += 1
            if ahead:
                self._retire()  # before the boundary: a joiner may take a row that just finished
            self._boundary = True
            try:
                yield events
            finally:
                self._boundary = False
            for seq, reason in list(self._cancelled.items()):  # cancelled while the events were handled
                if self.finish[seq] is None and self.seqs.row_of[seq] is not None:
                    self.finish[seq] = reason
            if ahead:
                self._retire()
                self._join_queued()
                if self.done:
                    return
                logits = self._pending(upcoming)
                continue
            queued = self._queued
            go_on = not self.done
            feed = torch.tensor(self.seqs.feed(host, self.pad), dtype=torch.long)
            retired = self.seqs.to_retire()
            changes = (Changes(tuple(retired), tuple(payload for _, payload, _ in queued), self.batched_joins)
                       if retired or queued else None)
            if self.sync is not None:
                self.sync.step(feed, go_on, changes)
            if not go_on:
                return
            for seq, _, make in queued:  # the followers make theirs now too, in this order
                if make is not None:
                    try:
                        self.seqs.prefixes[seq] = make()
                    except ValueError as exc:
                        self.rejected[seq] = str(exc)
                        self.finish[seq] = "rejected"
            stepped = state.step(feed.to(picked.device))
            for row in retired:
                state.retire(row)
            self._join_queued()
            logits = self._pending(stepped)

    def results(self) -> list[GenResult]:
        """Each request's tokens (and logits, if kept) once the batch is done, in admission order."""
        vocab = 0
        out = []
        for tokens, logits in zip(self.tokens, self.logits):
            if logits:
                vocab = logits[0].shape[-1]
            stacked = torch.stack(logits) if logits else torch.empty((0, vocab))
            out.append(GenResult(list(tokens), stacked))
        return out


def greedy_batch(llm: torch.nn.Module, prefixes: Sequence[LlmPrefix], max_new_tokens: Sequence[int] | int, *,
                 keep_logits: bool = True, factory: BatchFactory | None = None,
                 sampling: Sequence[SamplingParams | None] | None = None) -> list[GenResult]:
    """Decode a batch to the end (greedy unless ``sampling`` says otherwise); one :class:`GenResult` per prefix."""
    limits = [max_new_tokens] * len(prefixes) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    batch = GreedyBatch(llm, prefixes, limits, keep_logits=keep_logits, factory=factory, sampling=sampling)
    for _ in batch:
        pass
    return batch.results()


@torch.no_grad()
def follow_batch(llm: torch.nn.Module, prefixes: Sequence[LlmPrefix], source: StepSource) -> int:
    """A follower rank's side of a batch: the same forwards as rank 0, fed rank 0's tokens, and the same retires
    and joins in the same order (each joiner at the row ``room`` gives, as on rank 0). Returns the steps run."""
    state = make_batch(llm, prefixes)
    state.prefill()
    device = model_device(llm)
    steps = 1
    while True:
        tokens, go_on, changes = source.step(state.size)
        if not go_on:
            return steps
        state.step(tokens.to(device))
        steps += 1
        if changes is not None:
            for row in changes.retired:
                state.retire(row)
            joiners = [joiner for joiner in changes.joined if joiner is not None]  # None: refused (on rank 0 too)
            for group in [joiners] if changes.batched else [[joiner] for joiner in joiners]:
                rows = [state.room(prefix.length, limit, claimed) for claimed, (prefix, limit) in enumerate(group)]
                if None in rows:
                    raise RuntimeError("rank 0 sent a joiner this rank's batch state has no room for")
                if group:
                    state.join_many([(row, prefix) for row, (prefix, _) in zip(rows, group)])
