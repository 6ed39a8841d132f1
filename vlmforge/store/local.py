"""Local-directory backend of the artifact store: same layout on disk, atomic renames, flock-based CAS."""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vlmforge.artifacts.manifest import FileEntry
from vlmforge.errors import IntegrityError, NotFound, StoreError
from vlmforge.store.backend import PreconditionFailed
from vlmforge.store.base import ArtifactStore
from vlmforge.store.keys import SCRATCH, blob_key
from vlmforge.store.records import IncompleteUpload, ObjectInfo
from vlmforge.store.transfer import ProgressSink, RangedCopy, TaskGroup, copy_range_fetcher, never_retry

logger = logging.getLogger(__name__)

_SCRATCH_FILE = re.compile(r"^[0-9a-f]{32}\.tmp(\.parts)?$")
"""The only names this backend writes into its scratch directory (and so the only ones gc removes there)."""


class LocalStore(ArtifactStore):
    """An artifact store in a local (or shared POSIX) directory."""

    def __init__(self, root: Path, **kwargs: Any) -> None:
        self.root = Path(root).expanduser().absolute()
        super().__init__(f"file://{self.root}", **kwargs)
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"store path {self.root} exists and is not a directory")

    def _path(self, key: str) -> Path:
        return self.root / key

    def _tmp(self) -> Path:
        tmp = self.root / SCRATCH
        tmp.mkdir(parents=True, exist_ok=True)
        return tmp / f"{uuid.uuid4().hex}.tmp"

    @contextmanager
    def _key_lock(self, key: str) -> Iterator[None]:
        locks = self.root / ".flock"
        locks.mkdir(parents=True, exist_ok=True)
        fd = os.open(locks / hashlib.sha1(key.encode()).hexdigest(), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _get(self, key: str) -> tuple[bytes, str]:
        try:
            data = self._path(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(f"{key} not found in {self.url}") from None
        return data, hashlib.sha256(data).hexdigest()[:32]

    def _put(self, key: str, data: bytes, *, if_absent: bool = False, if_version: str | None = None) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._tmp()
        with tmp.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            if if_absent:
                try:
                    os.link(tmp, path)  # atomic create-exclusive of a complete file
                except FileExistsError:
                    raise PreconditionFailed(key) from None
            elif if_version is not None:
                with self._key_lock(key):
                    try:
                        current = hashlib.sha256(path.read_bytes()).hexdigest()[:32]
                    except FileNotFoundError:
                        raise PreconditionFailed(key) from None
                    if current != if_version:
                        raise PreconditionFailed(key)
                    os.replace(tmp, path)
            else:
                os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def _size(self, key: str) -> int | None:
        try:
            return self._path(key).stat().st_size
        except (FileNotFoundError, NotADirectoryError):
            return None

    def _list(self, prefix: str) -> Iterator[ObjectInfo]:
        base = self._path(prefix)
        if not base.is_dir():
            return
        for dirpath, _dirnames, filenames in os.walk(base):
            for name in filenames:
                path = Path(dirpath) / name
                try:
                    st = path.stat()
                except FileNotFoundError:
                    continue
                yield ObjectInfo(
                    key=path.relative_to(self.root).as_posix(),
                    size=st.st_size,
                    modified=datetime.fromtimestamp(st.st_mtime, UTC),
                )

    def _children(self, prefix: str) -> list[str]:
        base = self._path(prefix)
        if not base.is_dir():
            return []
        return sorted(entry.name for entry in os.scandir(base) if entry.is_dir())

    def _entries(self, prefix: str) -> list[str]:
        base = self._path(prefix) if prefix else self.root
        if not base.is_dir():
            return []
        return sorted(entry.name + ("/" if entry.is_dir(follow_symlinks=False) else "") for entry in os.scandir(base))

    def _delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def _schedule_upload(
        self, source: Path, entry: FileEntry, group: TaskGroup, sink: ProgressSink, *, verify: bool
    ) -> Callable[[], None] | None:
        tmp = self._tmp()
        blob = self._path(blob_key(entry.sha256))

        def publish_blob() -> None:
            blob.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, blob)

        copy = RangedCopy(
            tmp, entry, copy_range_fetcher(source, self.settings.io_chunk), self.settings,
            what=f"upload of {source}", on_done=publish_blob, retryable=never_retry, verify=verify,
        )
        copy.schedule(group, sink)

        def cleanup() -> None:
            tmp.unlink(missing_ok=True)
            tmp.with_name(tmp.name + ".parts").unlink(missing_ok=True)

        return cleanup

    def _schedule_download(
        self, entry: FileEntry, dest: Path, group: TaskGroup, sink: ProgressSink, on_done: Callable[[], None]
    ) -> None:
        blob = self._path(blob_key(entry.sha256))
        if not blob.is_file():
            raise IntegrityError(f"blob {entry.sha256} of {entry.path} is missing from {self.url}")
        RangedCopy(
            dest, entry, copy_range_fetcher(blob, self.settings.io_chunk), self.settings,
            what=f"blob {entry.sha256[:12]} of {entry.path}", on_done=on_done, retryable=never_retry,
        ).schedule(group, sink)

    def _list_incomplete(self, started_before: datetime) -> list[IncompleteUpload]:
        scratch = self.root / SCRATCH
        if not scratch.is_dir():
            return []
        found = []
        for entry in os.scandir(scratch):
            if not _SCRATCH_FILE.match(entry.name) or not entry.is_file(follow_symlinks=False):
                continue  # not ours: never touched
            try:
                modified = datetime.fromtimestamp(entry.stat(follow_symlinks=False).st_mtime, UTC)
            except FileNotFoundError:
                continue
            if modified < started_before:
                found.append(IncompleteUpload(kind="scratch file", key=f"{SCRATCH}/{entry.name}", started=modified))
        return sorted(found, key=lambda item: item.key)

    def _remove_incomplete(self, items: Sequence[IncompleteUpload]) -> int:
        for item in items:
            (self.root / item.key).unlink(missing_ok=True)
        return len(items)
