"""torch.export needs the process to itself: a readers-writer gate between the ONNX export and other torch work.

While torch.export traces, torch holds process-wide state: ``torch.compiler.is_exporting()`` is true for every
thread, and functions torch wraps with ``torch._disable_dynamo`` add and remove keys of one shared dict
(``torch.fx.traceback.current_meta``) on every call. Torch work in another thread meanwhile takes the export-time
branches of torch and transformers, and races on that dict: the hf build's quantize stage, beside the visual
stage's export, failed with a KeyError out of ``fx.traceback.annotate`` while building a LlamaForCausalLM.

So the export holds the gate exclusively and each hf stage's torch work holds it shared. The stages still run
side by side (the visual stage's loading and its ONNX Runtime check overlap the LLM branch), never beside an export.
Writers are preferred: an export waiting for the gate is not starved by the LLM branch's next stage.

The state is process-wide, so the gate is one per process (:data:`EXPORT_GATE`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


class ExportGate:
    """Shared for torch work, exclusive for an export; re-entrant per thread, writers preferred."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers: dict[int, int] = {}  # thread -> depth
        self._writer: int | None = None
        self._writer_depth = 0
        self._writers_waiting = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        """Torch work that must not run while another thread exports."""
        me = threading.get_ident()
        with self._cond:
            if me not in self._readers and self._writer != me:
                while self._writer is not None or self._writers_waiting:
                    self._cond.wait()
            self._readers[me] = self._readers.get(me, 0) + 1
        try:
            yield
        finally:
            with self._cond:
                self._readers[me] -= 1
                if not self._readers[me]:
                    del self._readers[me]
                    self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """An export: waits until no other thread does torch work under :meth:`shared`, and holds them off."""
        me = threading.get_ident()
        with self._cond:
            if self._writer != me:
                if me in self._readers:  # would wait for itself
                    raise RuntimeError("an export inside this thread's own shared torch work would never start: "
                                       "export outside the stage's shared section")
                self._writers_waiting += 1
                try:
                    while self._writer is not None or self._readers:
                        self._cond.wait()
                finally:
                    self._writers_waiting -= 1
                self._writer = me
            self._writer_depth += 1
        try:
            yield
        finally:
            with self._cond:
                self._writer_depth -= 1
                if not self._writer_depth:
                    self._writer = None
                    self._cond.notify_all()

    def exporting(self) -> bool:
        """Whether some thread holds the gate exclusively now."""
        with self._cond:
            return self._writer is not None


EXPORT_GATE = ExportGate()


def beside_exports(fn: Callable[P, R]) -> Callable[P, R]:
    """Run ``fn`` under :data:`EXPORT_GATE` shared: a stage whose torch work must not overlap an export."""

    @wraps(fn)
    def gated(*args: P.args, **kwargs: P.kwargs) -> R:
        with EXPORT_GATE.shared():
            return fn(*args, **kwargs)

    return gated
