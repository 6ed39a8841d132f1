"""The work directory: one folder per completed stage, keyed by the stage's input fingerprint.

A stage runs in a scratch folder and is renamed into place with its record written last, so a
build killed at any moment leaves either a complete stage or nothing; the next run skips every
stage whose inputs' fingerprint is unchanged and redoes the rest.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from vlmforge.errors import BuildError
from vlmforge.sources.base import DigestCache, FileEntry, hash_tree
from vlmforge.system.processes import pid_alive

log = logging.getLogger(__name__)
RECORD = "_stage.json"
STAGE_LOG_ATTR = "vlmforge_stage"
"""Log record attribute naming the stage a record reports the outcome of (``logger.info(reason, extra=...)``):
the CLI's progress display counts these records."""


class StageRecord(BaseModel):
    """What a completed stage produced."""

    stage: str
    fingerprint: str
    completed_at: datetime
    seconds: float
    """Wall time of the stage's own work."""
    result: dict[str, Any]
    """The stage's typed result, as JSON."""
    files: list[FileEntry]


@dataclass(frozen=True)
class StageOutcome:
    """A stage's folder and record, and whether this run did the work or reused it."""

    path: Path
    record: StageRecord
    skipped: bool

    @property
    def result(self) -> dict[str, Any]:
        return self.record.result

    @property
    def log_extra(self) -> dict[str, str]:
        """``extra`` for the log record that reports this outcome."""
        return {STAGE_LOG_ATTR: self.record.stage}

    @property
    def reason(self) -> str:
        if self.skipped:
            return (f"{self.record.stage} skipped: inputs' fingerprint {self.record.fingerprint[:12]} unchanged "
                    f"(completed {self.record.completed_at:%Y-%m-%d %H:%M:%S} UTC)")
        return f"{self.record.stage} done in {self.record.seconds:.2f}s (fingerprint {self.record.fingerprint[:12]})"


class Workdir:
    """Stage folders under ``root/<model>/<stage>-<fingerprint>``. ``digests``: the file digests this build has
    computed, shared by its stages and sources, so a file (or a hard link to it) is hashed once per build."""

    def __init__(self, root: Path, digests: DigestCache | None = None) -> None:
        self.root = Path(root).expanduser()
        self.digests = digests or DigestCache()

    def stage_path(self, model: str, stage: str, fingerprint: str) -> Path:
        return self.root / model / f"{stage}-{fingerprint[:16]}"

    def completed(self, model: str, stage: str, fingerprint: str) -> StageRecord | None:
        """The record of a completed stage, if present and its files are all there at their sizes."""
        path = self.stage_path(model, stage, fingerprint)
        record_path = path / RECORD
        if not record_path.is_file():
            return None
        try:
            record = StageRecord.model_validate_json(record_path.read_text())
        except ValueError:
            log.warning("ignoring unreadable stage record %s", record_path)
            return None
        if record.fingerprint != fingerprint:
            return None
        for entry in record.files:
            file = path / entry.path
            if not file.is_file() or file.stat().st_size != entry.size:
                log.warning("stage %s is incomplete (%s changed): redoing it", path.name, entry.path)
                return None
        return record

    def run(self, model: str, stage: str, fingerprint: str, work: Callable[[Path], BaseModel | dict[str, Any]]) -> StageOutcome:
        """Reuse the completed stage for ``fingerprint`` or run ``work(scratch_dir)`` and commit its folder."""
        final = self.stage_path(model, stage, fingerprint)
        record = self.completed(model, stage, fingerprint)
        if record is not None:
            return StageOutcome(final, record, skipped=True)
        final.parent.mkdir(parents=True, exist_ok=True)
        scratch = final.with_name(f".{final.name}.partial-{os.getpid()}")
        for stale in final.parent.glob(f".{final.name}.partial-*"):
            if not _pid_alive(stale.name.rpartition("-")[2]):  # a live one is another build's stage at work
                shutil.rmtree(stale, ignore_errors=True)
        scratch.mkdir(parents=True)
        start = time.perf_counter()
        try:
            result = work(scratch)
            payload = result.model_dump(mode="json") if isinstance(result, BaseModel) else dict(result)
            record = StageRecord(stage=stage, fingerprint=fingerprint, completed_at=datetime.now(UTC),
                                 seconds=time.perf_counter() - start, result=payload,
                                 files=hash_tree(scratch, digests=self.digests))
            (scratch / RECORD).write_text(record.model_dump_json(indent=2))
            if final.exists():
                shutil.rmtree(final)
            os.replace(scratch, final)
        except OSError as exc:
            shutil.rmtree(scratch, ignore_errors=True)
            if exc.errno == errno.ENOSPC:
                raise BuildError(f"{stage}: no space left in the work dir {self.root} (free some, or use --workdir)") from None
            raise
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
        return StageOutcome(final, record, skipped=False)


def _pid_alive(pid: str) -> bool:
    return pid.isdigit() and pid_alive(int(pid))
