"""The GPU decode fast path for decoder-only LLMs: a static KV cache and a compiled decode step.

Eager decoding with a dynamic cache spends most of a step launching kernels and growing the cache.
Here every batch is padded to a bucket (batch size a power of two, cache length a multiple of
``length_multiple``); each bucket owns a preallocated :class:`transformers.StaticCache`, input
buffers updated in place, and the decode step compiled with ``torch.compile(mode="reduce-overhead")``
(CUDA graphs). Only the step that repeats is compiled, not the whole model (compiling the whole
LLaVA forward overwrites CUDA-graph outputs between calls); the prefill runs eagerly.

Cache slots follow the left-padded layout of :mod:`vlmforge.runner.batching`: slot ``j < L`` holds
the prefixes (padding masked out), slot ``L + t`` the t-th generated token of every row; the 2D
attention mask spans the whole cache and gains one column per step. Rows added to fill a bucket are
dummies whose outputs are dropped.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vlmforge.runner.batching import PrefixBatch, _cache_kwarg, _stack
from vlmforge.toolchains.hf.common import LlmPrefix, model_device

log = logging.getLogger(__name__)


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
    """One (batch, cache length) bucket: its cache, buffers and compiled step, reused batch after batch."""

    batch: int
    length: int
    cache: Any
    mask: torch.Tensor
    ids: torch.Tensor
    positions: torch.Tensor
    step: Any
    compiled_at: float | None = None


class StaticDecoder:
    """Static caches and compiled decode steps for one decoder-only LLM (one per loaded engine)."""

    def __init__(self, llm: torch.nn.Module, *, max_batch_size: int, max_length: int | None = None,
                 length_multiple: int = 256, compile: bool = True, mode: str = "reduce-overhead") -> None:
        self.llm = llm
        self.max_batch_size = max_batch_size
        config = llm.config
        self.max_length = max_length or int(getattr(config, "max_position_embeddings", 4096))
        self.length_multiple = length_multiple
        self.compile = compile
        self.mode = mode
        self.cache_kwarg = _cache_kwarg(llm)
        self.device = model_device(llm)
        self._slots: dict[tuple[int, int], _Slot] = {}
        # CUDA graph trees keep their state per thread: one thread captures and replays every graph, so
        # warm-up (any thread) and the scheduler's batches (its own thread) can share the buckets.
        self._graph_thread = (ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlmforge-cudagraphs")
                              if compile and self.device.type == "cuda" else None)
        if compile:
            import torch._dynamo

            # one compiled step per bucket: allow as many as there are buckets
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)


    def _slot(self, batch: int, length: int) -> _Slot:
        key = (batch, length)
        if key not in self._slots:
            from transformers import StaticCache

            cache = StaticCache(config=self.llm.config, max_cache_len=length)
            mask = torch.zeros((batch, length), dtype=torch.long, device=self.device)
            ids = torch.zeros((batch, 1), dtype=torch.long, device=self.device)
            positions = torch.zeros((batch, 1), dtype=torch.long, device=self.device)
            llm, kwarg = self.llm, self.cache_kwarg

            def step(ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
                out = llm(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                          **{kwarg: cache})
                return out.logits[:, -1, :]

            compiled = torch.compile(step, mode=self.mode, dynamic=False) if self.compile else step
            self._slots[key] = _Slot(batch, length, cache, mask, ids, positions, compiled)
            log.info("static decode bucket: batch %d, cache %d%s", batch, length, " (compiling)" if self.compile else "")
        return self._slots[key]

    def batch(self, prefixes: Sequence[LlmPrefix], max_new_tokens: int) -> StaticBatch:
        if any(p.kind != "decoder" for p in prefixes):
            raise ValueError("the static decode path serves decoder-only LLMs")
        if len(prefixes) > self.max_batch_size:
            raise ValueError(f"{len(prefixes)} requests exceed the static batch limit {self.max_batch_size}")
        longest = max(p.length for p in prefixes)
        slot = self._slot(bucket_batch(len(prefixes), self.max_batch_size),
                          bucket_length(longest + max_new_tokens, self.length_multiple, self.max_length))
        return StaticBatch(self, slot, prefixes)

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
        filler = prefixes[0]  # dummy rows: a copy of the first request, their outputs dropped
        rows = list(prefixes) + [filler] * (slot.batch - len(prefixes))
        self.embeds, mask, _ = _stack(rows, left=True)
        self.prefix_mask = mask
        self.positions = (mask.cumsum(-1) - 1).clamp(min=0)
        self.written = mask.shape[1]

    def prefill(self) -> torch.Tensor:
        slot, llm = self.slot, self.decoder.llm
        slot.cache.reset()
        slot.mask.zero_()
        slot.mask[:, :self.written] = self.prefix_mask
        out = llm(inputs_embeds=self.embeds, attention_mask=slot.mask, position_ids=self.positions, use_cache=True,
                  **{self.decoder.cache_kwarg: slot.cache})
        slot.positions.copy_(self.positions[:, -1:] + 1)
        self.embeds = None  # type: ignore[assignment]
        return out.logits[:self.size, -1]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        slot = self.slot
        if self.written >= slot.length:
            raise RuntimeError(f"the static cache of {slot.length} positions is full")
        slot.ids[:self.size, 0] = tokens
        slot.ids[self.size:, 0] = tokens[0]
        slot.mask[:, self.written] = 1
        owner = self.decoder._graph_thread

        def replay() -> torch.Tensor:
            if owner is not None:
                torch.compiler.cudagraph_mark_step_begin()
            return slot.step(slot.ids, slot.positions, slot.mask)[:self.size].clone()  # the graph reuses its output

        logits = owner.submit(replay).result() if owner is not None else replay()
        slot.positions.add_(1)
        self.written += 1
        return logits
