"""Ahead-of-time compiled decode steps: what makes a warm start skip Dynamo's tracing.

``torch.compiler.save_cache_artifacts()`` (the tune artifact's first part) spares a warm start Inductor's code
generation and autotuning, but not Dynamo tracing the 7B model's step again (about a minute on an H200). torch's
precompile API does: ``torch.compile(fn, fullgraph=True).aot_compile(example_inputs)`` traces and compiles once and
returns a function that ``save_compiled_function`` serializes (bytecode, the compiled graph and its kernels;
the weights and cache buffers are arguments, not part of it) and ``torch.compiler.load_compiled_function`` loads in
another process without tracing anything.

Such a package runs without Dynamo's guards (they cannot all be serialized: the model and cache objects are
matched by identity), so nothing rechecks shapes, dtypes or devices at call time. That is sound here because
everything the guards would check is fixed by what the package is stored under: one bucket's exact shapes
(``(batch, cache length)``), the build's fingerprint (architecture, dtype), the device, torch and Triton versions
and the compile mode (:class:`vlmforge.store.tune.TuneKey`), and the decoder calls each package only with its own
bucket's buffers. torch without this API (or a step that does not trace as one graph) compiles just in time, as
before.

Only the step function and the cache layer class are serialized by reference, so both live at module level here.
"""

from __future__ import annotations

import io
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import StaticCache
from transformers.cache_utils import StaticLayer

log = logging.getLogger(__name__)


class InPlaceStaticLayer(StaticLayer):
    """transformers' static layer, its update an indexed store (Inductor keeps it in place instead of lowering
    ``index_copy_`` to a rewrite of the whole layer buffer)."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        positions = torch.arange(key_states.shape[-2], device=self.device) + self.cumulative_length
        self.cumulative_length.add_(key_states.shape[-2])
        self.keys[:, :, positions] = key_states
        self.values[:, :, positions] = value_states
        return self.keys, self.values


def in_place_static_cache(config: Any, max_cache_len: int) -> Any:
    """A :class:`transformers.StaticCache` whose full-attention layers update in place under Inductor
    (sliding-window and other layer kinds are kept as transformers makes them)."""
    cache = StaticCache(config=config, max_cache_len=max_cache_len)
    cache.layers = [InPlaceStaticLayer(max_cache_len=old.max_cache_len) if type(old) is StaticLayer else old
                    for old in cache.layers]
    return cache


def step_past_key_values(llm: Any, cache: Any, ids: torch.Tensor, positions: torch.Tensor,
                         mask: torch.Tensor) -> torch.Tensor:
    """One decode step of an LLM whose forward takes the cache as ``past_key_values``: the last position's logits."""
    out = llm(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, past_key_values=cache)
    return out.logits[:, -1, :]


def step_cache(llm: Any, cache: Any, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The same, for a forward that takes the cache as ``cache`` (newer transformers)."""
    out = llm(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, cache=cache)
    return out.logits[:, -1, :]


STEPS: dict[str, Callable[..., torch.Tensor]] = {"past_key_values": step_past_key_values, "cache": step_cache}
"""The step function for each name an LLM's forward gives its cache argument."""


def supported() -> bool:
    """Whether this torch can compile ahead of time, save and load a compiled function."""
    return (hasattr(torch.compiler, "load_compiled_function") and hasattr(torch.compiler, "skip_all_guards_unsafe")
            and callable(getattr(torch.compile(step_cache), "aot_compile", None)))


def compile_step(kwarg: str, mode: str, args: tuple[Any, ...]) -> Any:
    """Trace and compile the decode step for these exact arguments (a bucket's model, cache and buffers, the cache
    already initialized); the compiled function, callable with the same arguments, and savable. Raises what
    torch raises (a graph break, an unserializable object)."""
    from torch._inductor import list_mode_options

    options = {**list_mode_options(mode), "guard_filter_fn": torch.compiler.skip_all_guards_unsafe}
    compiled = torch.compile(STEPS[kwarg], fullgraph=True, dynamic=False, options=options)
    with torch.no_grad():
        return compiled.aot_compile((args, {}))


def save(compiled: Any) -> bytes:
    """A compiled step's package."""
    with tempfile.TemporaryDirectory(prefix="vlmforge-step-") as tmp:
        path = Path(tmp) / "step.bin"
        compiled.save_compiled_function(str(path))
        return path.read_bytes()


def load(data: bytes) -> Any:
    """A compiled step from its package (no tracing, no compiling)."""
    return torch.compiler.load_compiled_function(io.BytesIO(data))
