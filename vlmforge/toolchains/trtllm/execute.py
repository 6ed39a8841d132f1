"""The trtllm toolchain: execute a plan's argv steps inside NVIDIA's TensorRT-LLM container.

Each step runs as a subprocess (no shell); every output line is passed to a callback (the Prefect
run log) and kept in a per-step log file. A step whose outputs exist and whose marker records the
same argv is skipped, so a killed build resumes after its last completed step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import shutil
import subprocess
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmforge.errors import BuildError, PlanError, ToolchainUnavailable
from vlmforge.plans.model import Plan, Step
from vlmforge.system.env import require_trtllm

log = logging.getLogger(__name__)
MARKERS = ".vlmforge-steps"


def check_buildable(family: Any) -> None:
    """Refuse, before any work, a family the trtllm flow cannot finish: it validates every engine against the
    family's transformers reference, which a plan-only family (``hf_supported = False``) lacks."""
    if not family.hf_supported:
        raise ToolchainUnavailable(f"{family.name}: `vlmforge build` validates every TensorRT engine against the "
                                   "transformers reference, which this family lacks; render the exact commands with "
                                   f"`vlmforge plan` and run them in NVIDIA's container ({family.hf_unsupported_reason})")


def require_examples(plan: Plan) -> None:
    """The plan's working directories (the release's examples) must exist: a wrong image fails here, not mid-build."""
    missing = sorted({step.cwd for step in plan.steps if not Path(step.cwd).is_dir()})
    if missing:
        raise ToolchainUnavailable(
            f"TensorRT-LLM's example scripts are not at {', '.join(missing)}: this container does not match dialect "
            f"{plan.dialect.value} ({plan.requirements.tensorrt_llm}); pick the matching image or --dialect"
        )


def _within(path: str, other: str) -> bool:
    """``path`` is ``other`` or lies below it."""
    path, other = posixpath.normpath(path), posixpath.normpath(other)
    return path == other or path.startswith(other.rstrip("/") + "/")


def overlaps(a: str, b: str) -> bool:
    """Deleting one of the two paths would delete (part of) the other."""
    return _within(a, b) or _within(b, a)


def check_step_paths(plan: Plan) -> None:
    """Refuse, before anything runs, a step whose outputs overlap what it reads or edits: a step's stale outputs
    are deleted before it runs, which would delete its own inputs (a file it patches in place is an edit)."""
    for step in plan.steps:
        for out in step.outputs:
            clash = [path for path in step.inputs + step.edits if overlaps(out, path)]
            if clash:
                raise PlanError(f"step {step.name}: output {out} overlaps its input {clash[0]}; running it would "
                                "delete what it reads (list a file a step changes in place under edits, not outputs)")


@dataclass(frozen=True)
class StepRun:
    step: Step
    log_path: Path
    seconds: float
    skipped: bool


def _marker(workspace: Path, step: Step, before: str) -> tuple[Path, str]:
    """The step's completion marker and digest: its argv and cwd chained with the digest of the step before, so a
    step that runs again (a new source revision, another flag) makes every later step run again too."""
    digest = hashlib.sha256(json.dumps([before, step.argv, step.cwd]).encode()).hexdigest()[:16]
    return workspace / MARKERS / f"{step.name}-{digest}.done", digest


def run_step(step: Step, log_path: Path, on_line: Callable[[str], None], *, env: dict[str, str] | None = None) -> float:
    """Run one step, streaming its output; raise BuildError with the last lines on failure."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    tail: deque[str] = deque(maxlen=20)
    start = time.perf_counter()
    try:
        proc = subprocess.Popen(step.argv, cwd=step.cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1, env={**os.environ, **(env or {})})
    except FileNotFoundError as exc:
        raise BuildError(f"step {step.name}: cannot start {step.argv[0]!r}: {exc.strerror}") from None
    assert proc.stdout is not None
    with log_path.open("w") as log_file:
        log_file.write("$ " + " ".join(step.argv) + f"\n# cwd: {step.cwd}\n")
        for line in proc.stdout:
            log_file.write(line)
            tail.append(line.rstrip())
            on_line(f"[{step.name}] {line.rstrip()}")
    code = proc.wait()
    if code != 0:
        raise BuildError(f"step {step.name} failed (exit code {code}); last lines:\n  " + "\n  ".join(tail)
                         + f"\nfull log: {log_path}")
    return time.perf_counter() - start


def execute_plan(plan: Plan, workspace: Path, log_dir: Path, on_line: Callable[[str], None], *,
                 inputs: str = "") -> list[StepRun]:
    """Run every step of ``plan`` in order, skipping those already completed with the same argv and ``inputs``
    (the source's resolved revision: a new one runs every step again, from the download on).

    A step's outputs are deleted before it runs (what an interrupted run left); its edits never are. A step that
    edits in place runs again whenever an earlier step of this run wrote the file it edits (a fresh clone is
    unpatched), and is otherwise skipped like any other: its edits are not idempotent (``sed`` appending a line).
    """
    check_step_paths(plan)
    require_trtllm()
    require_examples(plan)
    runs = []
    digest = inputs
    written: list[str] = []  # outputs of the steps this run executed
    for index, step in enumerate(plan.steps, 1):
        marker, digest = _marker(workspace, step, digest)
        log_path = log_dir / f"{index:02d}-{step.name}.log"
        fresh_edit = any(overlaps(edit, out) for edit in step.edits for out in written)
        if marker.is_file() and all(Path(out).exists() for out in step.outputs) and not fresh_edit:
            on_line(f"[{step.name}] skipped: completed before with the same command and inputs")
            runs.append(StepRun(step, log_path, 0.0, True))
            continue
        for out in step.outputs:  # what an interrupted or older run left: the step starts from nothing
            shutil.rmtree(out, ignore_errors=True) if Path(out).is_dir() else Path(out).unlink(missing_ok=True)
        seconds = run_step(step, log_path, on_line)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"argv": step.argv, "seconds": seconds}))
        written += step.outputs
        runs.append(StepRun(step, log_path, seconds, False))
    return runs
