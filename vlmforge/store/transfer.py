"""Fast verified transfers: task groups, part planning, in-order hashing, resumable ranged copies, progress bars."""

from __future__ import annotations

import hashlib
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from vlmforge.artifacts.manifest import RESERVED_PREFIX, FileEntry
from vlmforge.errors import IntegrityError
from vlmforge.system.hashing import sha256_and_size

logger = logging.getLogger(__name__)

MiB = 1024 * 1024
T = TypeVar("T")


class TransferSettings(BaseModel):
    """Tuning of parallel transfers; the defaults suit S3 and local disks alike."""

    model_config = ConfigDict(frozen=True)

    workers: int = Field(default=10, ge=1, le=256, description="concurrent part transfers (threads)")
    part_size: int = Field(default=8 * MiB, ge=1, description="bytes per multipart upload part")
    download_part_size: int = Field(default=32 * MiB, ge=1, description="smallest ranged GET / parallel copy part")
    max_download_part_size: int = Field(
        default=256 * MiB, ge=1, description="largest range: a blob is split into about `workers` ranges in between"
    )
    min_part_size: int = Field(default=5 * MiB, ge=1, description="smallest part the server accepts (S3: 5 MiB)")
    max_parts: int = Field(default=10_000, ge=1, description="most parts per object (S3: 10000)")
    multipart_threshold: int = Field(default=16 * MiB, ge=1, description="objects at least this big go in parts")
    io_chunk: int = Field(default=4 * MiB, ge=4096, description="read/write/hash buffer size")
    attempts: int = Field(default=5, ge=1, description="tries per part on retryable errors")
    backoff: float = Field(default=0.2, ge=0, description="base seconds of exponential backoff between tries")


class ProgressSink(Protocol):
    """Receives transferred byte counts (negative to take back a failed attempt)."""

    def advance(self, nbytes: int) -> None: ...


class NullSink:
    """A progress sink that ignores everything."""

    def advance(self, nbytes: int) -> None:
        """Ignore ``nbytes``."""


class _RichSink:
    def __init__(self, progress: Progress, task: Any) -> None:
        self._progress = progress
        self._task = task

    def advance(self, nbytes: int) -> None:
        self._progress.advance(self._task, nbytes)


@contextmanager
def progress_bar(description: str, total: int, *, enabled: bool) -> Iterator[ProgressSink]:
    """A rich progress bar on stderr for a byte transfer, or a null sink when disabled."""
    if not enabled:
        yield NullSink()
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True)) as progress:
        yield _RichSink(progress, progress.add_task(description, total=total))


class TaskGroup:
    """A thread pool whose tasks may submit more tasks; ``wait`` re-raises the first failure.

    After a failure, queued tasks are cancelled and new submissions are dropped, so a
    failed transfer stops quickly; running tasks may check ``failed`` to stop early.
    """

    def __init__(self, workers: int, name: str = "vlmforge-xfer") -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
        self._lock = threading.RLock()
        self._idle = threading.Condition(self._lock)
        self._pending: set[Future[Any]] = set()
        self._error: BaseException | None = None

    @property
    def failed(self) -> bool:
        """Whether a task has failed."""
        return self._error is not None

    def submit(self, fn: Callable[..., Any], /, *args: Any) -> None:
        """Run ``fn(*args)`` in the pool unless the group has already failed."""
        with self._lock:
            if self._error is not None:
                return
            future = self._pool.submit(fn, *args)
            self._pending.add(future)
        future.add_done_callback(self._finished)

    def _finished(self, future: Future[Any]) -> None:
        with self._lock:
            self._pending.discard(future)
            if not future.cancelled():
                error = future.exception()
                if error is not None and self._error is None:
                    self._error = error
                    for other in list(self._pending):
                        other.cancel()
            self._idle.notify_all()

    def wait(self) -> None:
        """Block until every task (including ones submitted meanwhile) is done; raise the first failure."""
        with self._lock:
            while self._pending:
                self._idle.wait()
            error = self._error
        if error is not None:
            raise error

    def close(self) -> None:
        """Cancel what is queued and join the threads."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> TaskGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def plan_parts(size: int, settings: TransferSettings, part_size: int | None = None) -> list[tuple[int, int]]:
    """Split ``size`` bytes into (offset, length) parts honouring the part size, minimum and part count limits."""
    if size == 0:
        return [(0, 0)]
    part = max(part_size or settings.part_size, settings.min_part_size, -(-size // settings.max_parts))
    return [(offset, min(part, size - offset)) for offset in range(0, size, part)]


def download_range_size(size: int, settings: TransferSettings) -> int:
    """Range size for fetching a blob: about one range per worker, clamped to the download part limits.

    Fewer, larger ranges cost fewer requests for the same parallelism (and servers that
    materialise the whole object per ranged GET, like moto, do far less work).
    """
    per_worker = -(-size // settings.workers)
    return max(settings.download_part_size, min(per_worker, settings.max_download_part_size))


def read_range(fd: int, offset: int, length: int, chunk: int) -> Iterator[bytes]:
    """Yield the bytes of ``[offset, offset+length)`` of an open file in chunks."""
    end = offset + length
    while offset < end:
        data = os.pread(fd, min(chunk, end - offset), offset)
        if not data:
            raise IntegrityError(f"file shrank while reading (short read at offset {offset})")
        offset += len(data)
        yield data


def hash_file(path: Path, chunk: int = 4 * MiB, sink: ProgressSink | None = None) -> tuple[str, int]:
    """The sha256 hex digest and size of a file, read once in chunks."""
    return sha256_and_size(path, chunk, on_read=sink.advance if sink is not None else None)


def engine_files(root: Path) -> list[Path]:
    """Regular files under ``root`` (symlinks to files followed), skipping the store's reserved names."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        top = here == root
        if top:
            dirnames[:] = [d for d in dirnames if not d.startswith(RESERVED_PREFIX)]
        for name in filenames:
            if top and name.startswith(RESERVED_PREFIX):
                continue
            path = here / name
            if path.is_file():
                found.append(path)
        for name in dirnames:
            if (here / name).is_symlink():
                logger.warning("not following directory symlink %s", here / name)
    return sorted(found)


def hash_tree(root: Path, settings: TransferSettings, *, progress: bool = False) -> list[FileEntry]:
    """Hash every file of an engine directory in parallel; return manifest file entries sorted by path."""
    paths = engine_files(root)
    total = sum(p.stat().st_size for p in paths)
    entries: list[FileEntry] = []
    lock = threading.Lock()
    with progress_bar("hashing", total, enabled=progress) as sink, TaskGroup(settings.workers) as group:

        def one(path: Path) -> None:
            sha, size = hash_file(path, settings.io_chunk, sink)
            entry = FileEntry(path=path.relative_to(root).as_posix(), sha256=sha, size=size)
            with lock:
                entries.append(entry)

        for path in paths:
            group.submit(one, path)
        group.wait()
    return sorted(entries, key=lambda e: e.path)


class OrderedHasher:
    """Hashes a file's parts in order as they land on disk, so verification overlaps a parallel transfer."""

    def __init__(self, path: Path, parts: Sequence[tuple[int, int]], chunk: int) -> None:
        self._path = path
        self._parts = list(parts)
        self._chunk = chunk
        self._done = [False] * len(self._parts)
        self._next = 0
        self._busy = False
        self._lock = threading.Lock()
        self._digest = hashlib.sha256()

    def mark_done(self, index: int) -> None:
        """Record part ``index`` as written; hash every part that is now contiguous with the hashed prefix."""
        with self._lock:
            self._done[index] = True
            if self._busy:
                return
            self._busy = True
        try:
            while True:
                with self._lock:
                    if self._next >= len(self._parts) or not self._done[self._next]:
                        self._busy = False
                        return
                    offset, length = self._parts[self._next]
                fd = os.open(self._path, os.O_RDONLY)
                try:
                    for data in read_range(fd, offset, length, self._chunk):
                        self._digest.update(data)
                finally:
                    os.close(fd)
                with self._lock:
                    self._next += 1
        except BaseException:
            with self._lock:
                self._busy = False
            raise

    def hexdigest(self) -> str:
        """The sha256 of the whole file; every part must have been marked done."""
        with self._lock:
            if self._next != len(self._parts) or self._busy:
                raise RuntimeError("OrderedHasher.hexdigest called before every part was hashed")
            return self._digest.hexdigest()


class PartLog:
    """Append-only record of the completed parts of a resumable copy (``<file>.parts``)."""

    def __init__(self, path: Path, header: str) -> None:
        self.path = path
        self._header = header
        self._lock = threading.Lock()

    def resume(self) -> set[int]:
        """Completed part indices from a previous attempt with the same header, else start a fresh log."""
        try:
            lines = self.path.read_text().splitlines()
        except (FileNotFoundError, UnicodeDecodeError):
            lines = []
        if lines and lines[0] == self._header:
            return {int(line) for line in lines[1:] if line.isdigit()}
        self.reset()
        return set()

    def reset(self) -> None:
        """Start an empty log."""
        self.path.write_text(self._header + "\n")

    def add(self, index: int) -> None:
        """Record part ``index`` as complete."""
        with self._lock, self.path.open("a") as handle:
            handle.write(f"{index}\n")

    def remove(self) -> None:
        """Delete the log once the file is complete."""
        self.path.unlink(missing_ok=True)


FetchPart = Callable[[int, int, int, ProgressSink], None]
"""fetch(fd, offset, length, sink): write bytes [offset, offset+length) of the source into fd at offset."""


class RangedCopy:
    """A parallel, resumable, verified copy of one blob into ``dest`` through part fetches.

    Parts are fetched concurrently into a preallocated file; completed parts are logged next
    to it so an interrupted copy resumes where it stopped; the file is hashed in order while
    parts arrive and checked against the expected sha256 before ``on_done`` runs. On a hash
    mismatch the partial file is deleted and IntegrityError is raised.
    """

    def __init__(
        self,
        dest: Path,
        entry: FileEntry,
        fetch: FetchPart,
        settings: TransferSettings,
        *,
        what: str,
        on_done: Callable[[], None],
        retryable: Callable[[BaseException], bool],
        verify: bool = True,
    ) -> None:
        self.dest = dest
        self.entry = entry
        self._fetch = fetch
        self._settings = settings
        self._what = what
        self._on_done = on_done
        self._retryable = retryable
        self._parts = plan_parts(entry.size, settings, download_range_size(entry.size, settings))
        self._log = PartLog(dest.with_name(dest.name + ".parts"), f"v1 {entry.sha256} {entry.size} {self._parts[0][1]}")
        self._hasher = OrderedHasher(dest, self._parts, settings.io_chunk) if verify else None
        self._lock = threading.Lock()
        self._remaining = 0

    def schedule(self, group: TaskGroup, sink: ProgressSink) -> None:
        """Submit the missing parts to ``group`` (resuming from the part log)."""
        if self.dest.exists() and self.dest.stat().st_size == self.entry.size:
            done = self._log.resume()
        else:
            done = set()
            self._log.reset()
        fd = os.open(self.dest, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.ftruncate(fd, self.entry.size)
        finally:
            os.close(fd)
        done &= set(range(len(self._parts)))
        if done:
            logger.info("resuming %s: %d of %d parts already present", self._what, len(done), len(self._parts))
        missing = [index for index in range(len(self._parts)) if index not in done]
        # one unit per missing part, and one for the resumed parts (hashed by a task of their own): whichever of
        # them ends last finishes the copy, once
        self._remaining = len(missing) + 1
        sink.advance(sum(self._parts[i][1] for i in done))
        group.submit(self._resume_only, sorted(done))
        for index in missing:
            group.submit(self._part, index, group, sink)

    def _resume_only(self, indices: list[int]) -> None:
        for index in indices:
            if self._hasher is not None:
                self._hasher.mark_done(index)
        self._unit_done()

    def _unit_done(self) -> None:
        with self._lock:
            self._remaining -= 1
            last = self._remaining == 0
        if last:
            self._finish()

    def _part(self, index: int, group: TaskGroup, sink: ProgressSink) -> None:
        if group.failed:
            return
        offset, length = self._parts[index]
        fd = os.open(self.dest, os.O_WRONLY)
        try:
            retry(
                lambda: self._attempt(fd, offset, length, sink),
                self._settings,
                what=f"{self._what} part {index + 1}/{len(self._parts)}",
                retryable=self._retryable,
            )
        finally:
            os.close(fd)
        self._log.add(index)
        if self._hasher is not None:
            self._hasher.mark_done(index)
        self._unit_done()

    def _attempt(self, fd: int, offset: int, length: int, sink: ProgressSink) -> None:
        counted = _CountingSink(sink)
        try:
            self._fetch(fd, offset, length, counted)
        except BaseException:
            sink.advance(-counted.total)
            raise

    def _finish(self) -> None:
        self._log.remove()
        digest = self._hasher.hexdigest() if self._hasher is not None else self.entry.sha256
        if digest != self.entry.sha256:
            self.dest.unlink(missing_ok=True)
            raise IntegrityError(
                f"{self._what}: content has sha256 {digest}, expected {self.entry.sha256}; refusing corrupted data"
            )
        self._on_done()


class _CountingSink:
    def __init__(self, inner: ProgressSink) -> None:
        self._inner = inner
        self.total = 0

    def advance(self, nbytes: int) -> None:
        self.total += nbytes
        self._inner.advance(nbytes)


def retry(
    fn: Callable[[], T],
    settings: TransferSettings,
    *,
    what: str,
    retryable: Callable[[BaseException], bool],
) -> T:
    """Call ``fn`` up to ``settings.attempts`` times, backing off exponentially on retryable errors."""
    for attempt in range(1, settings.attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if attempt >= settings.attempts or not retryable(exc):
                raise
            delay = settings.backoff * (2 ** (attempt - 1)) * (0.5 + random.random())
            logger.warning("%s failed (%s: %s); retry %d/%d in %.1fs", what, type(exc).__name__, exc, attempt,
                           settings.attempts - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def copy_range_fetcher(source: Path, chunk: int) -> FetchPart:
    """A part fetcher copying from a local file with copy_file_range (falls back to pread/pwrite)."""

    def fetch(fd: int, offset: int, length: int, sink: ProgressSink) -> None:
        src = os.open(source, os.O_RDONLY)
        try:
            pos, end = offset, offset + length
            while pos < end:
                try:
                    n = os.copy_file_range(src, fd, min(chunk, end - pos), pos, pos)
                except OSError:
                    data = os.pread(src, min(chunk, end - pos), pos)
                    n = os.pwrite(fd, data, pos) if data else 0
                if n == 0:
                    raise IntegrityError(f"{source} is shorter than expected (ends before byte {end})")
                pos += n
                sink.advance(n)
        finally:
            os.close(src)

    return fetch


def never_retry(exc: BaseException) -> bool:
    """Retry predicate for local copies: errors are not transient."""
    return False
