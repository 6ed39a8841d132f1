"""What a build prints: one progress display and the result. Third-party warnings, per-file progress bars and
Prefect's run log only with ``--verbose`` (the run log reaches the Prefect UI either way).

The display is fed by log records: the build tasks log each stage's outcome with a ``vlmforge_stage`` attribute
(:data:`vlmforge.build.workdir.STAGE_LOG_ATTR`); other run-log lines show as the current step; warnings from anywhere print above the bar.
"""

from __future__ import annotations

import logging
import os
import warnings
from types import TracebackType

from rich.console import Console
from rich.markup import escape
from rich.table import Column
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn

from vlmforge.build.workdir import STAGE_LOG_ATTR

RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")

QUIET_ENV = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' and the hub's per-file bars ("Loading weights", shards)
    "TQDM_DISABLE": "1",  # any other tqdm bar
    "TRANSFORMERS_VERBOSITY": "error",
    "TORCH_LOGS": "-torch,-onnx,-export",  # torch's own log handlers: the ONNX exporter's "torchvision is not installed"
}
"""Set (unless already set) before torch and transformers are imported."""
QUIET_LOGGERS = ("torch", "transformers", "onnxscript", "onnx_ir", "modelopt", "huggingface_hub", "accelerate",
                 "httpx")


def quiet_third_party() -> None:
    """No third-party warnings or progress bars in this process (vlmforge's own warnings still show), and only
    warnings from the root logger's handlers (Prefect's INFO run log still reaches its API handler)."""
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", module=r"vlmforge(\.|$)")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for handler in logging.getLogger().handlers:
        handler.setLevel(max(handler.level, logging.WARNING))


class BuildProgress(logging.Handler):
    """A rich progress bar over a build's stages, on ``console`` (stderr), for the length of a ``with`` block.

    While it shows, the root logger's other handlers are muted and this one prints what matters through the
    display: each stage's outcome as a line above the bar, warnings, and the latest run-log line as the current
    step. The failure of a stage is not repeated (the CLI prints the error once).
    """

    def __init__(self, console: Console, model: str, stages: int | None) -> None:
        super().__init__(level=logging.INFO)
        self.console = console
        self.progress = Progress(SpinnerColumn(), TextColumn(f"[bold]{escape(model)}[/]"), BarColumn(bar_width=16),
                                 MofNCompleteColumn(), TimeElapsedColumn(),
                                 TextColumn("{task.description}", table_column=Column(ratio=1, no_wrap=True,
                                                                                      overflow="ellipsis")),
                                 console=console, expand=True)
        self.stages = stages
        self.task: TaskID | None = None
        self._muted: list[tuple[logging.Handler, int]] = []

    def step(self, description: str) -> None:
        """Show ``description`` as the current step."""
        if self.task is not None:
            self.progress.update(self.task, description=escape(_first_line(description)))

    def __enter__(self) -> BuildProgress:
        root = logging.getLogger()
        self._muted = [(handler, handler.level) for handler in root.handlers]
        for handler, _ in self._muted:
            handler.setLevel(logging.CRITICAL + 1)
        root.addHandler(self)
        self.progress.start()
        self.task = self.progress.add_task("", total=self.stages)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.task is not None and kind is None:
            self.progress.update(self.task, description="done")
        self.progress.stop()
        logging.getLogger().removeHandler(self)
        for handler, level in self._muted:
            handler.setLevel(level)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stage = getattr(record, STAGE_LOG_ATTR, None)
            run_log = record.name.startswith(RUN_LOGGERS)
            if stage is not None and self.task is not None:
                self.progress.update(self.task, advance=1, description="running the build flow")
                self.progress.console.print(f"  [green]✓[/] {escape(record.getMessage())}", highlight=False,
                                            overflow="ellipsis", no_wrap=True)
            elif record.levelno >= logging.WARNING and not (run_log and record.levelno >= logging.ERROR):
                self.progress.console.print(f"[yellow]{record.levelname.lower()}:[/] {escape(record.getMessage())}",
                                            highlight=False)
            elif (record.name.startswith("prefect.task_runs") and record.levelno == logging.INFO
                  and not record.getMessage().startswith("Finished in state")):
                self.step(record.getMessage())  # e.g. the TensorRT-LLM plan's output lines
        except Exception:  # noqa: BLE001 - a display problem must not fail the build
            self.handleError(record)


def _first_line(text: str) -> str:
    return text.splitlines()[0] if text else ""
