"""Remembered source revisions, for sources whose revision is a pure function of this machine's code.

A ``tiny://`` source's revision is the digest of files it generates (seconds of torch and transformers imports);
the files change only when vlmforge, an installed library or the machine does, which the source's
:meth:`~vlmforge.sources.base.Source.revision_key` covers. The memo keeps ``key -> revision`` in the work dir, written
by every real resolution (the build's fetch stage, or the published-build check on a miss), so checking whether a
tiny build is already published costs no generation. Sources without a key are always resolved for real.
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

from pydantic import BaseModel, ValidationError

from vlmforge.sources import Source

log = logging.getLogger(__name__)

MEMO_DIR = ".revisions"


class RememberedRevision(BaseModel):
    """One memo entry."""

    source: str
    key: str
    revision: str


class RevisionMemo:
    """``<workdir>/.revisions/<key>.json``: the revision a source resolved to under a revision key."""

    def __init__(self, workdir_root: Path) -> None:
        self.root = Path(workdir_root).expanduser() / MEMO_DIR

    def recall(self, source: Source) -> str | None:
        """The remembered revision of ``source`` under its current key (None: not remembered, or no key)."""
        key = source.revision_key()
        if key is None:
            return None
        path = self.root / f"{key}.json"
        try:
            entry = RememberedRevision.model_validate_json(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValidationError, ValueError):
            log.warning("ignoring unreadable revision memo %s", path)
            return None
        return entry.revision if entry.key == key and entry.source == str(source.uri) else None

    def remember(self, source: Source, revision: str) -> None:
        """Record a revision ``source`` really resolved to (no-op for sources without a key); never fails a build."""
        key = source.revision_key()
        if key is None:
            return
        entry = RememberedRevision(source=str(source.uri), key=key, revision=revision)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = self.root / f".{key}.{uuid.uuid4().hex}.tmp"
            tmp.write_text(entry.model_dump_json())
            os.replace(tmp, self.root / f"{key}.json")
        except OSError as exc:
            log.warning("could not remember the revision of %s in %s: %s", source.uri, self.root, exc)

    def resolve(self, source: Source) -> str:
        """The remembered revision, else a real resolution (remembered for next time)."""
        remembered = self.recall(source)
        if remembered is not None:
            return remembered
        revision = source.resolve_revision()
        self.remember(source, revision)
        return revision
