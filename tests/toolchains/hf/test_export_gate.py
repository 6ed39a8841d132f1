"""torch.export's process-wide state never meets the hf stages' torch work in another thread (export_gate).

The regression: the flow's quantize stage, beside the visual stage's ONNX export, failed in CI with a KeyError out of
``torch.fx.traceback.annotate`` (torch.export's shared annotation dict, touched from both threads)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from vlmforge.toolchains.hf import stages
from vlmforge.toolchains.hf.export_gate import EXPORT_GATE, ExportGate, beside_exports
from vlmforge.toolchains.hf.onnx import export_onnx


class SlowVisual(torch.nn.Module):
    """A visual module whose trace takes a while and says when it started."""

    def __init__(self, tracing: threading.Event) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 3)
        self.tracing = tracing

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        self.tracing.set()
        time.sleep(0.4)
        return self.proj(pixels.flatten(2).mean(-1)).unsqueeze(1)


@beside_exports
def _watch_for_exports(stop: threading.Event, seen: list[bool], seconds: float = 30.0,
                       inside: threading.Event | None = None) -> None:
    if inside is not None:
        inside.set()
    end = time.monotonic() + seconds
    while time.monotonic() < end and not stop.is_set():
        seen.append(torch.compiler.is_exporting())
        time.sleep(0.005)


def _export(tmp_path: Path, tracing: threading.Event) -> None:
    export_onnx(SlowVisual(tracing), tmp_path / "model.onnx", torch.randn(2, 4, 8, 8), prefer=("dynamo",))


def test_stage_work_started_first_holds_the_export_off(tmp_path: Path) -> None:
    _export(tmp_path / "warm", threading.Event())  # the exporter's first imports take seconds
    seen: list[bool] = []
    stop, inside = threading.Event(), threading.Event()
    watcher = threading.Thread(target=_watch_for_exports, args=(stop, seen), kwargs={"inside": inside})
    watcher.start()
    assert inside.wait(10)
    tracing = threading.Event()
    exporter = threading.Thread(target=_export, args=(tmp_path, tracing))
    exporter.start()
    assert not tracing.wait(3.0), "the export traced while a stage's torch work ran"
    stop.set()
    watcher.join()
    exporter.join()
    assert tracing.is_set() and seen and not any(seen)
    assert (tmp_path / "model.onnx").is_file()


def test_stage_work_waits_for_a_running_export(tmp_path: Path) -> None:
    tracing = threading.Event()
    exporter = threading.Thread(target=_export, args=(tmp_path, tracing))
    exporter.start()
    assert tracing.wait(60)
    seen: list[bool] = []
    _watch_for_exports(threading.Event(), seen, seconds=0.05)  # blocks until the export is done
    exporter.join()
    assert seen and not any(seen)


@pytest.mark.parametrize("stage", ["convert", "quantize", "build_llm", "validate"])
def test_every_llm_side_stage_waits_for_an_export(stage: str, tmp_path: Path) -> None:
    held, release, done = threading.Event(), threading.Event(), threading.Event()

    def export() -> None:
        with EXPORT_GATE.exclusive():
            held.set()
            release.wait(10)

    def run_stage() -> None:
        try:  # arguments it cannot use: it fails at once, but only once it may start
            getattr(stages, stage)(None, tmp_path, tmp_path, tmp_path) if stage == "build_llm" else \
                getattr(stages, stage)(None, tmp_path, tmp_path)
        except Exception:  # noqa: BLE001 - the failure is expected; the timing is the test
            pass
        done.set()

    holder = threading.Thread(target=export)
    holder.start()
    assert held.wait(10)
    runner = threading.Thread(target=run_stage)
    runner.start()
    assert not done.wait(0.3), f"{stage} ran while an export held the gate"
    release.set()
    assert done.wait(10)
    holder.join()
    runner.join()


def test_readers_share_and_a_waiting_writer_goes_first() -> None:
    gate, order = ExportGate(), []
    first_in, second_in = threading.Event(), threading.Event()
    leave = threading.Event()

    def reader(event: threading.Event, name: str) -> None:
        with gate.shared():
            order.append(name)
            event.set()
            leave.wait(10)

    a = threading.Thread(target=reader, args=(first_in, "a"))
    b = threading.Thread(target=reader, args=(second_in, "b"))
    a.start()
    b.start()
    assert first_in.wait(5) and second_in.wait(5)  # both inside at once

    def writer() -> None:
        with gate.exclusive():
            order.append("export")

    w = threading.Thread(target=writer)
    w.start()
    deadline = time.monotonic() + 10
    while not gate._writers_waiting and time.monotonic() < deadline:  # the writer waits for the readers
        time.sleep(0.005)
    assert gate._writers_waiting == 1

    def late_reader() -> None:
        with gate.shared():
            order.append("late")

    late = threading.Thread(target=late_reader)
    late.start()
    time.sleep(0.1)
    assert order == ["a", "b"] or order == ["b", "a"]  # the writer waits for the readers; the late reader for it
    leave.set()
    for thread in (a, b, w, late):
        thread.join(10)
    assert order[2:] == ["export", "late"]


def test_reentrant_per_thread_and_an_export_inside_shared_work_is_refused() -> None:
    gate = ExportGate()
    with gate.exclusive(), gate.exclusive(), gate.shared():
        assert gate.exporting()
    assert not gate.exporting()
    with gate.shared(), gate.shared():
        with pytest.raises(RuntimeError, match="never start"):
            with gate.exclusive():
                pass
