"""The GPU decode fast path for decoder-only LLMs: a static KV cache and a compiled, graph-captured decode step.

Eager decoding with a dynamic cache spends most of a step launching kernels and growing the cache.
Here every batch is padded to a bucket (batch size a power of two, cache length a multiple of
``length_multiple``); each bucket owns a preallocated :class:`transformers.StaticCache` and input
buffers updated in place. Its decode step is compiled with ``torch.compile`` (Inductor fuses the
small kernels; ``max-autotune-no-cudagraphs`` also tunes the batch-1 matrix-vector products) and, on
a GPU, captured once into a :class:`torch.cuda.CUDAGraph` that every later step replays: a step is
one graph launch. Only the step that repeats is compiled, not the whole model (compiling the whole
LLaVA forward overwrites CUDA-graph outputs between calls); the prefill runs eagerly.

The graph is captured here rather than by ``mode="reduce-overhead"`` (Inductor's CUDA-graph trees):
those treat the cache tensors as inputs to copy into the graph's own buffers before every replay
(64 copies of a full cache layer per LLaMA-7B step, about 0.4 ms of a 6-7 ms step on an H100), keep
their state per thread, and need a mark per step. Measured with ``bench/decode_probe.py``.

Cache slots follow the left-padded layout of :mod:`vlmforge.runner.batching`: slot ``j < L`` holds
the prefixes (padding masked out), slot ``L + t`` the t-th generated token of every row; the 2D
attention mask spans the whole cache and gains one column per step. Rows added to fill a bucket are
dummies whose outputs are dropped.

In-flight joins (:meth:`StaticBatch.join_many`): every row writes column ``written`` each step, so a new request of
``Lp`` prompt positions takes a free row (retired, or a dummy) at columns ``[written - Lp, written)``: the requests
joining at one boundary are prefilled together, eagerly (one left-padded forward with a dynamic cache of its own),
each one's keys and values are copied into the bucket's cache buffers in place (the captured graph keeps reading the
same addresses), and its mask row is opened only over those columns.

The cache's layers write a step's keys and values with an indexed store (``keys[:, :, pos] = k``)
instead of transformers' ``index_copy_``, which Inductor lowers to a rewrite of the whole layer buffer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vlmforge.modeling.devices import model_device
from vlmforge.modeling.generation import LlmPrefix, cache_kwarg
from vlmforge.runner.batching import PrefixBatch, _last_logits_only, _stack
from vlmforge.runner.states import _check_rows, _next_row, _prefill_joiners

log = logging.getLogger(__name__)

STATIC_REFUSAL = ("the static decode path builds no bidirectional prefill mask (a prefix's token_type_ids: Gemma3's "
                  "image blocks) and keeps no sliding-window layers: serve such an LLM with --decode dynamic")
CROSS_REFUSAL = ("the static decode path feeds no cross-attention states (a prefix's cross_states: mllama's image "
                 "tiles) and its cache has no cross-attention layers: serve such an LLM with --decode dynamic")


def in_place_static_cache(config: Any, max_cache_len: int) -> Any:
    """A :class:`transformers.StaticCache` whose full-attention layers update in place under Inductor
    (:class:`vlmforge.runner.precompile.InPlaceStaticLayer`)."""
    from vlmforge.runner.precompile import in_place_static_cache as make

    return make(config, max_cache_len)


def bucket_batch(size: int, limit: int) -> int:
    """The smallest power of two >= ``size`` (at most ``limit``, at least ``size``)."""
    bucket = 1
    while bucket < size:
        bucket *= 2
    return max(size, min(bucket, limit))


def bucket_length(length: int, multiple: int, limit: int) -> int:
    rounded = -(-length // multiple) * multiple
    if length > limit:
        raise ValueError(f"{length} positions exceed the model's {limit}")
    return min(rounded, limit)


@dataclass
class _Slot:
    """One (batch, cache length) bucket: its cache, input buffers and decode step, reused batch after batch."""

    batch: int
    length: int
    cache: Any
    mask: torch.Tensor
    ids: torch.Tensor
    positions: torch.Tensor
    step: Any
    graph: torch.cuda.CUDAGraph | None = None
    logits: torch.Tensor | None = None  # the graph's output buffer


class StaticDecoder:
    """Static caches and compiled decode steps for one decoder-only LLM (one per loaded engine).

    ``compile`` compiles each bucket's step with ``torch.compile(mode=mode)``; ``graphs`` (default: on a
    GPU) captures it into a CUDA graph. A bucket is made, compiled and captured the first time a batch
    needs it (seconds to a minute for a 7B model): :meth:`warmup` does it before serving.

    Warm starts (:mod:`vlmforge.runner.precompile`): :meth:`compile_packages` compiles every bucket made so far ahead of
    time and returns the packages (``vlmforge tune --precompile``); :meth:`preload` hands over saved packages, and a
    bucket that has one loads it instead of tracing and compiling. Where loading fails, the step is compiled just in
    time as without them.
    """

    def __init__(self, llm: torch.nn.Module, *, max_batch_size: int, max_length: int | None = None,
                 length_multiple: int = 256, compile: bool = True, mode: str = "max-autotune-no-cudagraphs",
                 graphs: bool | None = None) -> None:
        self.llm = llm
        self._packages: dict[tuple[int, int], bytes] = {}
        """Saved step packages to load, by bucket (:meth:`preload`)."""
        self.precompiled: list[tuple[int, int]] = []
        """The buckets whose step was loaded from a package: not traced, not compiled."""
        self.max_batch_size = max_batch_size
        config = llm.config
        self.max_length = max_length or int(getattr(config, "max_position_embeddings", 4096))
        self.length_multiple = length_multiple
        self.compile = compile
        self.mode = mode
        self.cache_kwarg = cache_kwarg(llm)
        self.device = model_device(llm)
        self.graphs = self.device.type == "cuda" if graphs is None else graphs
        if self.graphs and self.device.type != "cuda":
            raise ValueError("CUDA graphs need the LLM on a CUDA device")
        if "cudagraphs" not in mode and mode != "default" and self.graphs:
            raise ValueError(f"compile mode {mode!r} captures CUDA graphs itself; use a *-no-cudagraphs mode "
                             "(this decoder captures the step)")
        self._slots: dict[tuple[int, int], _Slot] = {}
        if compile:
            import torch._dynamo

            # one compiled step per bucket: allow as many as there are buckets
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)

    def _slot(self, batch: int, length: int) -> _Slot:
        key = (batch, length)
        if key not in self._slots:
            started = time.perf_counter()
            cache = in_place_static_cache(self.llm.config, length)
            mask = torch.zeros((batch, length), dtype=torch.long, device=self.device)
            ids = torch.zeros((batch, 1), dtype=torch.long, device=self.device)
            positions = torch.zeros((batch, 1), dtype=torch.long, device=self.device)
            slot = _Slot(batch, length, cache, mask, ids, positions, None)
            slot.step = self._step(slot)
            if self.graphs:
                self._capture(slot)
            self._slots[key] = slot
            log.info("static decode bucket: batch %d, cache %d (%s%s) in %.1fs", batch, length,
                     f"compiled {self.mode}" if self.compile else "eager", ", CUDA graph" if self.graphs else "",
                     time.perf_counter() - started)
        return self._slots[key]

    def _step(self, slot: _Slot) -> Any:
        """The slot's decode step, ``step(ids, positions, mask) -> logits``: loaded from a package, compiled just in
        time, or eager."""
        llm, kwarg, cache, key = self.llm, self.cache_kwarg, slot.cache, (slot.batch, slot.length)
        if self.compile and key in self._packages:
            from vlmforge.runner import precompile

            self._initialize(slot)  # the package runs without guards: the cache must exist before it runs
            try:
                compiled = precompile.load(self._packages.pop(key))
            except Exception as exc:  # noqa: BLE001 - torch's own errors; the step still compiles just in time
                log.warning("bucket %d x %d: the precompiled step did not load (%s: %s); compiling just in time",
                            slot.batch, slot.length, type(exc).__name__, exc)
            else:
                self.precompiled.append(key)
                return lambda ids, positions, mask: compiled(llm, cache, ids, positions, mask)

        def step(ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            out = llm(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **{kwarg: cache})
            return out.logits[:, -1, :]

        return torch.compile(step, mode=self.mode, dynamic=False) if self.compile else step

    def preload(self, packages: Mapping[tuple[int, int], bytes]) -> None:
        """Saved step packages (:meth:`compile_packages` of an earlier process on a machine of the same kind) for the
        buckets made from now on."""
        self._packages.update(packages)

    @torch.no_grad()
    def compile_packages(self) -> dict[tuple[int, int], bytes]:
        """Compile the step of every bucket made so far ahead of time (a second compile, beside the one the bucket
        runs); their packages, by bucket. Raises what torch raises where it cannot (no precompile API in this
        torch, a step that does not trace as one graph)."""
        from vlmforge.runner import precompile

        if not precompile.supported():
            raise RuntimeError(f"torch {torch.__version__} has no ahead-of-time compile to save (torch.compile(...)"
                               ".aot_compile, torch.compiler.load_compiled_function)")
        packages = {}
        for key, slot in sorted(self._slots.items()):
            compiled = precompile.compile_step(self.cache_kwarg, self.mode, (self.llm, slot.cache, slot.ids,
                                                                             slot.positions, slot.mask))
            packages[key] = precompile.save(compiled)
        return packages

    @torch.no_grad()
    def _initialize(self, slot: _Slot) -> None:
        """One eager token through the slot's cache: it makes the cache's lazily made buffers (their addresses are
        what a CUDA graph records, and what a step compiled ahead of time takes as given); reset after use."""
        slot.mask[:, 0] = 1
        hidden = self.llm.get_input_embeddings().weight
        self.llm(inputs_embeds=hidden.new_zeros((slot.batch, 1, hidden.shape[1])), attention_mask=slot.mask,
                 position_ids=slot.positions, use_cache=True, **{self.cache_kwarg: slot.cache})
        slot.cache.reset()
        slot.mask.zero_()

    @torch.no_grad()
    def _capture(self, slot: _Slot) -> None:
        """Compile (first call) and capture the slot's step; the dummy steps' cache writes are reset after."""
        mask = slot.mask
        self._initialize(slot)
        mask[:, 0] = 1
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):  # compile, autotune, and let every lazy allocation happen before the capture
                slot.step(slot.ids, slot.positions, mask)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            slot.logits = slot.step(slot.ids, slot.positions, mask)
        slot.graph = graph
        slot.cache.reset()
        mask.zero_()

    def buckets(self, batch_sizes: Sequence[int], prompt_length: int, max_new_tokens: int) -> set[tuple[int, int]]:
        """The (batch, cache length) buckets :meth:`warmup` compiles for these shapes."""
        length = bucket_length(prompt_length + max_new_tokens, self.length_multiple, self.max_length)
        return {(bucket_batch(size, self.max_batch_size), length) for size in batch_sizes}

    def batch(self, prefixes: Sequence[LlmPrefix], max_new_tokens: int) -> StaticBatch:
        if any(p.kind != "decoder" for p in prefixes):
            raise ValueError("the static decode path serves decoder-only LLMs")
        if any(p.positions is not None for p in prefixes):
            raise ValueError("the static decode path keeps one position per column: M-RoPE prefixes (Qwen2-VL) take "
                             "the eager path (--decode dynamic)")
        if any(p.token_type_ids is not None for p in prefixes):
            raise ValueError(STATIC_REFUSAL)
        if any(p.cross_states is not None for p in prefixes):
            raise ValueError(CROSS_REFUSAL)
        if len(prefixes) > self.max_batch_size:
            raise ValueError(f"{len(prefixes)} requests exceed the static batch limit {self.max_batch_size}")
        longest = max(p.length for p in prefixes)
        slot = self._slot(bucket_batch(len(prefixes), self.max_batch_size),
                          bucket_length(longest + max_new_tokens, self.length_multiple, self.max_length))
        return StaticBatch(self, slot, prefixes)

    @torch.no_grad()
    def warmup(self, batch_sizes: Sequence[int], prompt_length: int, max_new_tokens: int, steps: int = 3) -> None:
        """Compile (and capture) the buckets these shapes need, with dummy inputs."""
        hidden = self.llm.get_input_embeddings().weight.shape[1]
        dtype = self.llm.get_input_embeddings().weight.dtype
        for size in batch_sizes:
            prefix = LlmPrefix("decoder", torch.zeros((1, prompt_length, hidden), dtype=dtype, device=self.device),
                               torch.ones((1, prompt_length), dtype=torch.long, device=self.device), frozenset())
            started = time.perf_counter()
            batch = self.batch([prefix] * size, max_new_tokens)
            logits = batch.prefill()
            for _ in range(steps):
                logits = batch.step(logits.argmax(-1))
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            log.info("warmed up batch %d (bucket %d x %d) in %.1fs", size, batch.slot.batch, batch.slot.length,
                     time.perf_counter() - started)


class StaticBatch(PrefixBatch):
    """One batch in a bucket of :class:`StaticDecoder`."""

    def __init__(self, decoder: StaticDecoder, slot: _Slot, prefixes: Sequence[LlmPrefix]) -> None:
        self.decoder = decoder
        self.slot = slot
        self.size = len(prefixes)
        self.prefixes: list[LlmPrefix] | None = list(prefixes)
        self.written = max(p.length for p in prefixes)  # the prefixes are left-padded to the longest
        self.retired: set[int] = set()
        self.prefilled = False

    @torch.no_grad()  # with autograd on, the cache's in-place writes would keep the prefill's activations alive
    def prefill(self) -> torch.Tensor:
        """Prefill the requests and return their first-token logits [size, vocab]. A batch with fewer requests than
        the bucket's rows prefills its requests alone (:meth:`_prefill_live`) where the cache allows it; else (a full
        bucket, a cache not written yet, layers other than the in-place static ones) one forward over the whole
        bucket, its rows past ``size`` copies of the first request (dummies whose outputs are dropped)."""
        if self.prefixes is None:
            raise RuntimeError("this batch is already prefilled")
        slot, llm, prefixes = self.slot, self.decoder.llm, self.prefixes
        self.prefixes = None
        self.prefilled = True
        if self.size < slot.batch and self._live_prefill_possible():
            return self._prefill_live(prefixes)
        rows = prefixes + [prefixes[0]] * (slot.batch - len(prefixes))
        embeds, mask, _ = _stack(rows, left=True)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        slot.cache.reset()
        slot.mask.zero_()
        slot.mask[:, :self.written] = mask
        out = llm(inputs_embeds=embeds, attention_mask=slot.mask, position_ids=positions, use_cache=True,
                  **{self.decoder.cache_kwarg: slot.cache}, **_last_logits_only(llm))
        slot.positions.copy_(positions[:, -1:] + 1)
        return out.logits[:self.size, -1]

    def _live_prefill_possible(self) -> bool:
        """Whether every cache layer is an in-place static layer whose buffers exist (a bucket's first batch, as
        :meth:`StaticDecoder.warmup` runs it, allocates them)."""
        from vlmforge.runner.precompile import InPlaceStaticLayer

        return all(type(layer) is InPlaceStaticLayer and layer.is_initialized for layer in self.slot.cache.layers)

    def _prefill_live(self, prefixes: list[LlmPrefix]) -> torch.Tensor:
        """The requests alone in one left-padded forward with a dynamic cache of their own (as joiners are prefilled),
        their keys and values copied into rows ``[0, size)`` of the bucket's buffers in place: a batch of 2 requests
        in a bucket of 16 computes 2 rows, not 16. The dummy rows keep zeroed keys and a closed mask; from the first
        step on each sees only the columns it writes itself."""
        slot, end = self.slot, self.written
        logits, positions, own = _prefill_joiners(self.decoder.llm, prefixes)
        slot.cache.reset()
        for mine, theirs in zip(slot.cache.layers, own, strict=True):
            mine.keys[:self.size, :, :end] = theirs.keys
            mine.values[:self.size, :, :end] = theirs.values
            mine.cumulative_length.fill_(end)
        _, mask, _ = _stack(prefixes, left=True)
        slot.mask.zero_()
        slot.mask[:self.size, :end] = mask.to(slot.mask.device, slot.mask.dtype)
        slot.positions.zero_()
        slot.positions[:self.size] = positions[:, -1:] + 1
        return logits

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        slot = self.slot
        if self.written >= slot.length:
            raise RuntimeError(f"the static cache of {slot.length} positions is full")
        slot.ids[:self.size, 0] = tokens
        slot.ids[self.size:, 0] = tokens[0]
        slot.mask[:, self.written] = 1
        if slot.graph is not None:
            slot.graph.replay()
            logits = slot.logits[:self.size].clone()  # type: ignore[index]  # the next replay rewrites the buffer
        else:
            logits = slot.step(slot.ids, slot.positions, slot.mask)[:self.size]
        slot.positions.add_(1)
        self.written += 1
        return logits

    def join_refusal(self) -> str | None:
        """Why no request can join this bucket's batch (None: joins are possible): every cache layer must be the
        in-place static layer, whose column ``j`` is mask column ``j`` for every row. A sliding-window layer keeps a
        rolling window that all rows share (a joiner's keys have no fixed column in it), and other layer kinds are
        not written by this path."""
        from vlmforge.runner.precompile import InPlaceStaticLayer

        kinds = {type(layer).__name__ for layer in self.slot.cache.layers if type(layer) is not InPlaceStaticLayer}
        if kinds:
            return f"cache layers {sorted(kinds)} are not in-place static layers"
        if not self.prefilled:
            return "the batch has not been prefilled yet"
        return None

    def room(self, length: int, max_new_tokens: int, claimed: int = 0) -> int | None:
        """The row a prefix of ``length`` positions generating up to ``max_new_tokens`` tokens can join at now, after
        ``claimed`` joiners of this boundary took theirs: the retired rows lowest first, then ``size``, ``size + 1``...
        while the bucket has dummy rows or a larger bucket of the same length holds them (the join moves the batch
        there); None when its prefix does not fit left of column ``written``, its answer does not fit right of it
        (``written + max_new_tokens`` past the bucket's length), no row is free, or the bucket's layers refuse joins
        (:meth:`join_refusal`)."""
        if self.join_refusal() is not None or not 1 <= length <= self.written:
            return None
        if self.written + max_new_tokens > self.slot.length:
            return None
        row = _next_row(sorted(self.retired), self.size, claimed)
        if row < self.slot.batch or self._bucket_for(row + 1) is not None:
            return row
        return None

    def _bucket_for(self, rows: int) -> _Slot | None:
        """This bucket if it has ``rows`` rows, else the smallest larger bucket of this length that does, if it exists
        already (warmed up, or used before): a join into a full bucket moves the batch there (:meth:`_grow`). A bucket
        that does not exist yet is not made mid-batch: compiling and capturing it would stall every running row for a
        minute on a 7B model."""
        if rows <= self.slot.batch:
            return self.slot
        sizes = sorted(batch for batch, length in self.decoder._slots
                       if length == self.slot.length and rows <= batch <= self.decoder.max_batch_size)
        return self.decoder._slots[(sizes[0], self.slot.length)] if sizes else None

    def _grow(self, slot: _Slot) -> None:
        """Move the batch into the larger bucket ``slot`` (same length): every row's keys and values, mask and next
        position are copied into its buffers in place (a few milliseconds on a GPU: a copy of the cache); its extra
        rows are dummies, copies of row 0. The step after reads the new bucket; the old one is free again."""
        old, n = self.slot, self.slot.batch
        for theirs, mine in zip(old.cache.layers, slot.cache.layers, strict=True):
            if not mine.is_initialized:
                mine.lazy_initialization(theirs.keys[:1].expand(slot.batch, -1, -1, -1),
                                         theirs.values[:1].expand(slot.batch, -1, -1, -1))
            mine.keys[:n] = theirs.keys
            mine.values[:n] = theirs.values
            mine.keys[n:] = theirs.keys[:1]
            mine.values[n:] = theirs.values[:1]
            mine.cumulative_length.copy_(theirs.cumulative_length)
        slot.mask[:n] = old.mask
        slot.mask[n:] = old.mask[:1]
        slot.positions[:n] = old.positions
        slot.positions[n:] = old.positions[:1]
        self.slot = slot

    @torch.no_grad()
    def join_many(self, joins: Sequence[tuple[int, LlmPrefix]]) -> list[torch.Tensor]:
        """Place each ``prefix`` at its ``row`` (from :meth:`room`; ``size`` grows on an append, the batch moves into a
        larger bucket where the rows need one) and return each one's logits [vocab] of its first new token. They are
        prefilled together (one eager left-padded forward, a dynamic cache, positions from 0); each one's keys and
        values are copied into columns ``[written - Lp, written)`` of its row, in place. Other rows are untouched."""
        if not joins:
            return []
        reason = self.join_refusal()
        if reason is not None:
            raise RuntimeError(f"cannot join this static batch: {reason}")
        for _, prefix in joins:
            if prefix.kind != "decoder":
                raise ValueError(f"the static decode path serves decoder-only LLMs, not a {prefix.kind!r} prefix")
            if prefix.positions is not None:
                raise ValueError("the static decode path keeps one position per column, not M-RoPE positions")
            if prefix.token_type_ids is not None:
                raise ValueError(STATIC_REFUSAL)
            if prefix.cross_states is not None:
                raise ValueError(CROSS_REFUSAL)
            if not 1 <= prefix.length <= self.written:
                raise ValueError(f"a prefix of {prefix.length} positions does not fit left of column {self.written}: "
                                 "ask room() first")
        rows = [row for row, _ in joins]
        bucket = self._bucket_for(max(rows) + 1)
        if bucket is None:
            raise ValueError(f"row {max(rows)} is not free: the bucket of {self.slot.batch} rows is full and no "
                             f"larger bucket exists at length {self.slot.length}; join the rows room() returned")
        _check_rows(rows, self.retired, self.size, bucket.batch)
        if bucket is not self.slot:
            self._grow(bucket)
        slot, end = self.slot, self.written
        logits, positions, own = _prefill_joiners(self.decoder.llm, [prefix for _, prefix in joins])
        for index, (row, prefix) in enumerate(joins):
            length = prefix.length
            for mine, theirs in zip(slot.cache.layers, own, strict=True):
                mine.keys[row, :, end - length:end] = theirs.keys[index, :, -length:]
                mine.values[row, :, end - length:end] = theirs.values[index, :, -length:]
            slot.mask[row].zero_()
            slot.mask[row, end - length:end] = prefix.mask[0].to(slot.mask.device, slot.mask.dtype)
            slot.positions[row] = positions[index, -1] + 1
            self.retired.discard(row)
            self.size = max(self.size, row + 1)
        return list(logits)

    def retire(self, row: int) -> None:
        """``row`` finished: a later :meth:`join` may reuse it (until then it is fed a token and its outputs are
        ignored; its cache columns stay as they are, masked or not, since no other row attends to them)."""
        if not 0 <= row < self.size:
            raise ValueError(f"row {row} is not in this batch of {self.size} rows")
        self.retired.add(row)
