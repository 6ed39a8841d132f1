"""The primitives a storage backend supplies (small objects, listings, blob transfers), which the store builds on."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from datetime import datetime, timedelta
from pathlib import Path
from typing import Self

from vlmforge.artifacts.manifest import FileEntry
from vlmforge.store.records import IncompleteUpload, ObjectInfo
from vlmforge.store.transfer import ProgressSink, TaskGroup, TransferSettings

DEFAULT_GC_GRACE = timedelta(hours=1)
DEFAULT_LOCK_LEASE = timedelta(minutes=2)


class PreconditionFailed(Exception):
    """Backend signal: a conditional write lost (key exists / changed). Internal, never user-facing."""


class StoreBackend(ABC):
    """Object primitives of one storage backend, and the settings every part of the store reads.

    ``lock_lease``: how long a lock stays valid without renewal (its holder's heartbeat renews it every third of
    that); ``lock_ttl``: the age after which a lock without a lease (written before leases existed) is stale;
    ``gc_grace``: gc's default grace period for young blobs and upload leftovers.
    """

    def __init__(
        self,
        url: str,
        settings: TransferSettings | None = None,
        *,
        lock_ttl: timedelta = timedelta(hours=12),
        lock_wait: float = 300.0,
        lock_lease: timedelta = DEFAULT_LOCK_LEASE,
        gc_grace: timedelta = DEFAULT_GC_GRACE,
    ) -> None:
        self.url = url
        self.settings = settings or TransferSettings()
        self.lock_ttl = lock_ttl
        self.lock_wait = lock_wait
        self.lock_lease = lock_lease
        self.gc_grace = gc_grace

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    @abstractmethod
    def _get(self, key: str) -> tuple[bytes, str]:
        """Content and version tag of a small object; raise NotFound if absent."""

    @abstractmethod
    def _put(self, key: str, data: bytes, *, if_absent: bool = False, if_version: str | None = None) -> None:
        """Write a small object atomically; raise PreconditionFailed if the condition does not hold."""

    @abstractmethod
    def _size(self, key: str) -> int | None:
        """Size of an object, or None if absent."""

    @abstractmethod
    def _list(self, prefix: str) -> Iterator[ObjectInfo]:
        """All objects whose key starts with ``prefix`` (recursively)."""

    @abstractmethod
    def _children(self, prefix: str) -> list[str]:
        """Names of the immediate 'directories' below ``prefix`` (which ends with '/')."""

    @abstractmethod
    def _entries(self, prefix: str) -> list[str]:
        """Names of everything immediately below ``prefix`` ('' is the root); directories end with '/'."""

    @abstractmethod
    def _delete(self, key: str) -> None:
        """Delete an object; deleting an absent object is not an error."""

    @abstractmethod
    def _schedule_upload(
        self, source: Path, entry: FileEntry, group: TaskGroup, sink: ProgressSink, *, verify: bool
    ) -> Callable[[], None] | None:
        """Submit tasks storing ``source`` as the blob of ``entry`` (visible only once complete).

        Returns an optional cleanup to call if the group fails (e.g. abort a multipart upload).
        With ``verify`` the uploaded bytes are checked against ``entry.sha256`` before the blob appears.
        """

    @abstractmethod
    def _schedule_download(
        self, entry: FileEntry, dest: Path, group: TaskGroup, sink: ProgressSink, on_done: Callable[[], None]
    ) -> None:
        """Submit tasks copying the blob of ``entry`` into ``dest`` (resumable); verify it, then call ``on_done``."""

    @abstractmethod
    def _list_incomplete(self, started_before: datetime) -> list[IncompleteUpload]:
        """Leftovers of interrupted uploads (the store's own scratch files, multipart uploads) started before then."""

    @abstractmethod
    def _remove_incomplete(self, items: Sequence[IncompleteUpload]) -> int:
        """Remove the given upload leftovers; return how many were removed."""

    def _delete_many(self, keys: Sequence[str]) -> None:
        for key in keys:
            self._delete(key)

    def _backend_errors(self, what: str) -> AbstractContextManager[None]:
        """Translate backend exceptions escaping a transfer into StoreError."""
        return nullcontext()

    def close(self) -> None:
        """Release connections."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
