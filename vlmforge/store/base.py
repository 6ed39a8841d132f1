"""The artifact store API: refs, layout, publish and pull, aliases by compare-and-swap, locks and retention."""

from __future__ import annotations

import getpass
import logging
import os
import random
import shutil
import socket
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import UTC, datetime, timedelta
from enum import Enum
from pathlib import Path
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vlmforge.artifacts.manifest import EngineManifest, FileEntry, check_name
from vlmforge.errors import IntegrityError, NotFound, StoreConflict, StoreError
from vlmforge.store.transfer import (
    ProgressSink,
    TaskGroup,
    TransferSettings,
    engine_files,
    hash_file,
    hash_tree,
    progress_bar,
)
from vlmforge.system.processes import pid_alive

logger = logging.getLogger(__name__)

DEFAULT_ALIAS: Final = "latest"
MARKER: Final = ".vlmforge-manifest.json"
"""File written into a pulled engine directory: the manifest it was pulled from."""
ALIAS_HISTORY: Final = 100
WRITER_LOCKS: Final = "locks/writers/"
GC_LOCK: Final = "locks/gc.json"


def blob_key(sha256: str) -> str:
    """Key of the content-addressed blob holding bytes with this sha256."""
    return f"blobs/sha256/{sha256[:2]}/{sha256}"


def build_key(model: str, build_id: str) -> str:
    """Key of the immutable manifest of one build."""
    return f"models/{model}/builds/{build_id}.json"


def alias_key(model: str, alias: str) -> str:
    """Key of the mutable alias record of a model."""
    return f"models/{model}/aliases/{alias}.json"


def _now() -> datetime:
    return datetime.now(UTC)


def _actor() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def _name(value: str, what: str) -> str:
    try:
        return check_name(value, what)
    except ValueError as exc:
        raise StoreError(str(exc)) from None


class _AnyBuild(Enum):
    ANY = "ANY"


ANY: Final = _AnyBuild.ANY
"""``expected=ANY``: move an alias whatever it points to now (still by compare-and-swap, retried)."""


class PreconditionFailed(Exception):
    """Backend signal: a conditional write lost (key exists / changed). Internal, never user-facing."""


class Ref(BaseModel):
    """A reference to a build: ``MODEL`` (= ``MODEL@latest``), ``MODEL@ALIAS`` or ``MODEL#BUILD_ID``."""

    model_config = ConfigDict(frozen=True)

    model: str
    alias: str | None = None
    build_id: str | None = None

    @classmethod
    def parse(cls, text: str | Ref) -> Ref:
        """Parse a REF string; raise StoreError with the accepted forms if it is malformed."""
        if isinstance(text, Ref):
            return text
        model, alias, build_id = text, None, None
        if "#" in text:
            model, build_id = text.split("#", 1)
        elif "@" in text:
            model, alias = text.split("@", 1)
        try:
            check_name(model, "model name")
            if alias is not None:
                check_name(alias, "alias")
            if build_id is not None:
                check_name(build_id, "build id")
        except ValueError as exc:
            raise StoreError(f"bad reference {text!r}: {exc} (use MODEL, MODEL@ALIAS or MODEL#BUILD_ID)") from None
        return cls(model=model, alias=alias, build_id=build_id)

    @property
    def target_alias(self) -> str | None:
        """The alias this ref resolves through (``latest`` for a bare model), or None for an exact build."""
        return None if self.build_id is not None else (self.alias or DEFAULT_ALIAS)

    def __str__(self) -> str:
        if self.build_id is not None:
            return f"{self.model}#{self.build_id}"
        return f"{self.model}@{self.alias}" if self.alias else self.model


class ObjectInfo(BaseModel):
    """A stored object: key relative to the store root, size and modification time."""

    key: str
    size: int
    modified: datetime


class LockInfo(BaseModel):
    """Content of a lock object: who holds it and since when."""

    kind: Literal["writer", "gc"]
    purpose: str
    host: str
    pid: int
    by: str
    created_at: datetime


class AliasEvent(BaseModel):
    """One move of an alias."""

    build_id: str
    previous: str | None
    at: datetime
    by: str


class AliasRecord(BaseModel):
    """Content of an alias object: the build it points to, plus its history (newest first)."""

    schema_version: Literal[1] = 1
    model: str
    alias: str
    build_id: str
    updated_at: datetime
    by: str
    token: str = Field(description="unique per write; recognises our own write after a lost response")
    history: list[AliasEvent] = Field(default_factory=list)


class AliasMove(BaseModel):
    """Outcome of moving an alias."""

    model: str
    alias: str
    previous: str | None
    build_id: str = Field(description="the build the alias points to afterwards")
    moved: bool
    note: str = ""


class PublishResult(BaseModel):
    """Outcome of a publish."""

    manifest: EngineManifest
    created: bool = Field(description="False when an identical manifest was already published (idempotent rerun)")
    uploaded_blobs: int
    uploaded_bytes: int
    reused_blobs: int
    reused_bytes: int
    aliases: list[AliasMove]
    hash_seconds: float
    transfer_seconds: float
    seconds: float


class _BlobStats(BaseModel):
    uploaded_blobs: int = 0
    uploaded_bytes: int = 0
    reused_blobs: int = 0
    reused_bytes: int = 0


class BuildSummary(BaseModel):
    """One line of a build listing."""

    model: str
    build_id: str
    created_at: datetime
    toolchain: str
    files: int
    size: int
    aliases: list[str]
    gpu_name: str | None
    compute_capability: str | None
    world_size: int
    fingerprint: str


class ModelSummary(BaseModel):
    """One line of a model listing."""

    model: str
    builds: int
    aliases: dict[str, str]


class GcBuild(BaseModel):
    """A build considered by gc, with why it is kept or deleted."""

    model: str
    build_id: str
    created_at: datetime
    reasons: list[str]


class GcReport(BaseModel):
    """What gc kept and deleted (or would delete, in a dry run)."""

    applied: bool
    keep: int
    kept: list[GcBuild]
    deleted: list[GcBuild]
    blobs_kept: int
    bytes_kept: int
    blobs_deleted: int
    bytes_deleted: int
    dangling_aliases: list[str]
    missing_blobs: list[str]
    refused_manifests: list[str]
    incomplete_cleaned: int


class ArtifactStore(ABC):
    """Content-addressed engine store; subclasses supply object primitives and blob transfers.

    Layout (relative to the store root): ``blobs/sha256/<aa>/<hex>`` (file contents),
    ``models/<model>/builds/<build_id>.json`` (immutable manifests, written last),
    ``models/<model>/aliases/<alias>.json`` (moved by compare-and-swap), ``locks/`` (gc exclusion).
    """

    def __init__(
        self,
        url: str,
        settings: TransferSettings | None = None,
        *,
        lock_ttl: timedelta = timedelta(hours=12),
        lock_wait: float = 300.0,
    ) -> None:
        self.url = url
        self.settings = settings or TransferSettings()
        self.lock_ttl = lock_ttl
        self.lock_wait = lock_wait

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    # ---- primitives supplied by backends -------------------------------------------------

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
    def _cleanup_incomplete(self) -> int:
        """Remove leftovers of interrupted uploads (temp files, multipart uploads); return how many."""

    def _delete_many(self, keys: Sequence[str]) -> None:
        for key in keys:
            self._delete(key)

    def _backend_errors(self, what: str) -> AbstractContextManager[None]:
        """Translate backend exceptions escaping a transfer into StoreError."""
        return nullcontext()

    def close(self) -> None:
        """Release connections."""

    def __enter__(self) -> ArtifactStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- reading -------------------------------------------------------------------------

    def resolve(self, ref: str | Ref) -> EngineManifest:
        """The manifest a ref points to; raise NotFound (with what exists) or IntegrityError (refused manifest)."""
        parsed = Ref.parse(ref)
        if parsed.build_id is not None:
            return self._read_manifest(parsed.model, parsed.build_id)
        alias = parsed.target_alias or DEFAULT_ALIAS
        record = self.get_alias(parsed.model, alias)
        if record is None:
            known = sorted(self._alias_targets(parsed.model))
            if not known and not self._build_ids(parsed.model):
                raise NotFound(f"model {parsed.model!r} not found in {self.url}")
            hint = f"; aliases: {', '.join(known)}" if known else "; use MODEL#BUILD_ID (see `store ls MODEL`)"
            raise NotFound(f"model {parsed.model!r} has no alias {alias!r}{hint}")
        try:
            return self._read_manifest(parsed.model, record.build_id)
        except NotFound:
            raise NotFound(
                f"alias {parsed.model}@{alias} points to build {record.build_id}, which no longer exists"
            ) from None

    def get_alias(self, model: str, alias: str) -> AliasRecord | None:
        """The alias record, or None if the alias does not exist."""
        return self._read_alias(_name(model, "model name"), _name(alias, "alias"))[0]

    def list_models(self) -> list[ModelSummary]:
        """Every model in the store with its build count and aliases."""
        out = []
        for model in sorted(self._children("models/")):
            try:
                check_name(model, "model name")
            except ValueError:
                logger.warning("ignoring unexpected entry models/%s in %s", model, self.url)
                continue
            builds = len(self._build_ids(model))
            out.append(ModelSummary(model=model, builds=builds, aliases=self._alias_targets(model)))
        return out

    def list_builds(self, model: str | None = None) -> list[BuildSummary]:
        """Builds of one model (or all), newest first per model; unreadable manifests are skipped with a warning."""
        models = [_name(model, "model name")] if model is not None else [m.model for m in self.list_models()]
        out: list[BuildSummary] = []
        for name in models:
            aliases_of: dict[str, list[str]] = {}
            for alias, build_id in sorted(self._alias_targets(name).items()):
                aliases_of.setdefault(build_id, []).append(alias)
            manifests, refused = self._read_manifests(name, self._build_ids(name))
            for key, reason in refused:
                logger.warning("skipping %s: %s", key, reason)
            for m in sorted(manifests, key=EngineManifest.sort_key, reverse=True):
                out.append(
                    BuildSummary(
                        model=m.model,
                        build_id=m.build_id,
                        created_at=m.created_at,
                        toolchain=m.toolchain,
                        files=len(m.files),
                        size=m.total_size,
                        aliases=aliases_of.get(m.build_id, []),
                        gpu_name=m.hardware.gpu_name,
                        compute_capability=m.hardware.compute_capability,
                        world_size=m.world_size,
                        fingerprint=m.fingerprint,
                    )
                )
        return out

    def manifests(self, model: str) -> list[EngineManifest]:
        """Every readable manifest of ``model``, newest first (unreadable ones are skipped with a warning)."""
        ids = self._build_ids(_name(model, "model name"))  # one listing of this model's builds, not of the store
        if not ids:
            return []
        manifests, refused = self._read_manifests(model, ids)
        for key, reason in refused:
            logger.warning("skipping %s: %s", key, reason)
        return sorted(manifests, key=EngineManifest.sort_key, reverse=True)

    def find_by_fingerprint(self, model: str, fingerprint: str) -> EngineManifest | None:
        """The newest build of ``model`` with this fingerprint: a rebuild of the same inputs publishes nothing new."""
        return next((m for m in self.manifests(model) if m.fingerprint == fingerprint), None)

    def _read_manifest(self, model: str, build_id: str) -> EngineManifest:
        key = build_key(model, build_id)
        try:
            data, _ = self._get(key)
        except NotFound:
            raise NotFound(f"build {model}#{build_id} not found in {self.url}") from None
        manifest = EngineManifest.from_json(data, where=f"manifest {key}")
        if manifest.model != model or manifest.build_id != build_id:
            raise IntegrityError(
                f"refused manifest {key}: it describes {manifest.ref}, not {model}#{build_id}"
            )
        return manifest

    def _read_manifests(
        self, model: str, build_ids: Iterable[str]
    ) -> tuple[list[EngineManifest], list[tuple[str, str]]]:
        def one(build_id: str) -> EngineManifest | tuple[str, str]:
            try:
                return self._read_manifest(model, build_id)
            except (IntegrityError, NotFound) as exc:
                return (build_key(model, build_id), str(exc))

        ids = list(build_ids)
        if not ids:
            return [], []
        with ThreadPoolExecutor(max_workers=min(16, len(ids))) as pool:
            results = list(pool.map(one, ids))
        manifests = [r for r in results if isinstance(r, EngineManifest)]
        refused = [r for r in results if isinstance(r, tuple)]
        return manifests, refused

    def _build_ids(self, model: str) -> list[str]:
        prefix = f"models/{model}/builds/"
        return sorted(
            info.key[len(prefix) : -len(".json")]
            for info in self._list(prefix)
            if info.key.endswith(".json") and "/" not in info.key[len(prefix) :]
        )

    def _alias_targets(self, model: str) -> dict[str, str]:
        prefix = f"models/{model}/aliases/"
        targets = {}
        for info in self._list(prefix):
            name = info.key[len(prefix) :]
            if not name.endswith(".json") or "/" in name:
                continue
            record, _ = self._read_alias(model, name[: -len(".json")])
            if record is not None:
                targets[record.alias] = record.build_id
        return targets

    def _read_alias(self, model: str, alias: str) -> tuple[AliasRecord | None, str | None]:
        key = alias_key(model, alias)
        try:
            data, version = self._get(key)
        except NotFound:
            return None, None
        try:
            record = AliasRecord.model_validate_json(data)
        except ValidationError as exc:
            raise IntegrityError(f"refused alias record {key}: {exc.errors()[0]['msg']}") from None
        return record, version

    # ---- publishing ----------------------------------------------------------------------

    def publish(
        self,
        engine_dir: Path,
        manifest: EngineManifest,
        *,
        aliases: Sequence[str] = (DEFAULT_ALIAS,),
        progress: bool = False,
    ) -> PublishResult:
        """Publish an engine directory: upload missing blobs, write the manifest last, then move aliases.

        If ``manifest.files`` is empty the directory is hashed, and each file's upload starts as
        soon as its own hash is known (hashing overlaps the transfer). Otherwise those entries are
        used (precomputed by the caller) and every uploaded blob is verified against them.
        Publishing the same manifest again is a cheap no-op (idempotent rerun after a crash).
        Aliases only move forward: an alias already pointing to a newer build (by ``created_at``)
        is kept.
        """
        started = time.monotonic()
        engine_dir = Path(engine_dir)
        if not engine_dir.is_dir():
            raise StoreError(f"engine directory {engine_dir} does not exist or is not a directory")
        for alias in aliases:
            _name(alias, "alias")
        label = f"push {manifest.ref}"
        with self._writer_lock(f"publish {manifest.ref}"):
            if manifest.files:
                hashed = time.monotonic()
                existing = self._existing_build(manifest)  # identical build already there: local files not needed
                stats = _BlobStats()
                if existing is None:
                    self._check_local_files(engine_dir, manifest.files)
                    stats = self._upload_missing(engine_dir, manifest.files, verify=True, progress=progress,
                                                 label=label)
            elif self._build_exists(manifest.model, manifest.build_id):
                manifest = manifest.with_files(self._hash_dir(engine_dir, progress=progress))
                hashed = time.monotonic()
                existing = self._existing_build(manifest)
                stats = _BlobStats()
            else:
                files, stats, hashed = self._hash_and_upload(engine_dir, progress=progress, label=label)
                manifest = manifest.with_files(files)
                existing = None
            created = existing is None and self._create_manifest(manifest)
            transferred = time.monotonic()
            moves = [self._move_alias(manifest, alias, only_if_newer=True) for alias in aliases]
        done = time.monotonic()
        return PublishResult(
            manifest=manifest,
            created=created,
            uploaded_blobs=stats.uploaded_blobs,
            uploaded_bytes=stats.uploaded_bytes,
            reused_blobs=stats.reused_blobs,
            reused_bytes=stats.reused_bytes,
            aliases=moves,
            hash_seconds=hashed - started,
            transfer_seconds=transferred - hashed,
            seconds=done - started,
        )

    def _hash_dir(self, engine_dir: Path, *, progress: bool) -> list[FileEntry]:
        files = hash_tree(engine_dir, self.settings, progress=progress)
        if not files:
            raise StoreError(f"engine directory {engine_dir} holds no files")
        return files

    def _build_exists(self, model: str, build_id: str) -> bool:
        return self._size(build_key(model, build_id)) is not None

    def _hash_and_upload(
        self, engine_dir: Path, *, progress: bool, label: str
    ) -> tuple[list[FileEntry], _BlobStats, float]:
        """Hash files (biggest first, one lane per CPU) and start each missing blob's upload once hashed."""
        sized = sorted(((p.stat().st_size, p) for p in engine_files(engine_dir)), key=lambda sp: (-sp[0], sp[1]))
        if not sized:
            raise StoreError(f"engine directory {engine_dir} holds no files")
        todo = deque(path for _, path in sized)
        lanes = max(1, min(len(todo), os.cpu_count() or 1, 8))
        lock = threading.Lock()
        entries: list[FileEntry] = []
        claimed: set[str] = set()
        uploaded: set[str] = set()
        seen: dict[Path, tuple[FileEntry, int, int]] = {}
        stats = _BlobStats()
        cleanups: list[Callable[[], None]] = []
        hashed_at = [time.monotonic()]

        def lane(group: TaskGroup, sink: ProgressSink) -> None:
            while not group.failed:
                with lock:
                    if not todo:
                        hashed_at[0] = max(hashed_at[0], time.monotonic())
                        return
                    path = todo.popleft()
                before = path.stat()
                sha, size = hash_file(path, self.settings.io_chunk)
                entry = FileEntry(path=path.relative_to(engine_dir).as_posix(), sha256=sha, size=size)
                with lock:
                    entries.append(entry)
                    seen[path] = (entry, before.st_size, before.st_mtime_ns)
                    duplicate = sha in claimed
                    claimed.add(sha)
                if duplicate:
                    sink.advance(size)
                    continue
                if self._size(blob_key(sha)) == size:
                    with lock:
                        stats.reused_blobs += 1
                        stats.reused_bytes += size
                    sink.advance(size)
                    continue
                with lock:
                    stats.uploaded_blobs += 1
                    stats.uploaded_bytes += size
                    uploaded.add(sha)
                cleanup = self._schedule_upload(path, entry, group, sink, verify=False)
                if cleanup is not None:
                    with lock:
                        cleanups.append(cleanup)

        total = sum(size for size, _ in sized)
        with progress_bar(label, total, enabled=progress) as sink, TaskGroup(self.settings.workers + lanes) as group:
            try:
                with self._backend_errors("upload"):
                    for _ in range(lanes):
                        group.submit(lane, group, sink)
                    group.wait()
            except BaseException:
                group.close()
                for cleanup in cleanups:
                    cleanup()
                raise
        self._check_unchanged(seen, uploaded)
        logger.info("%s: uploaded %d blobs (%d bytes), %d already stored", label, stats.uploaded_blobs,
                    stats.uploaded_bytes, stats.reused_blobs)
        return sorted(entries, key=lambda e: e.path), stats, hashed_at[0]

    def _check_unchanged(self, seen: dict[Path, tuple[FileEntry, int, int]], uploaded: set[str]) -> None:
        """Refuse a publish whose files changed after hashing; drop blobs that may hold the new bytes.

        Blobs uploaded from our own fresh hashes are not hashed a second time, so a file still being
        written would otherwise leave a blob whose content does not match its name.
        """
        changed = []
        for path, (entry, size, mtime_ns) in seen.items():
            try:
                now = path.stat()
            except FileNotFoundError:
                now = None
            if now is None or now.st_size != size or now.st_mtime_ns != mtime_ns:
                changed.append(entry)
        if changed:
            self._delete_many([blob_key(e.sha256) for e in changed if e.sha256 in uploaded])
            more = f" (and {len(changed) - 1} more files)" if len(changed) > 1 else ""
            raise IntegrityError(
                f"{changed[0].path}{more} changed while being published;"
                " publish again once the engine directory is complete"
            )

    def _check_local_files(self, engine_dir: Path, files: Sequence[FileEntry]) -> None:
        for entry in files:
            path = engine_dir / entry.path
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                raise IntegrityError(f"manifest lists {entry.path}, which is missing from {engine_dir}") from None
            if size != entry.size:
                raise IntegrityError(f"{path} has {size} bytes, but the manifest says {entry.size}")

    def _existing_build(self, manifest: EngineManifest) -> EngineManifest | None:
        try:
            existing = self._read_manifest(manifest.model, manifest.build_id)
        except NotFound:
            return None
        if existing != manifest:
            raise StoreConflict(
                f"build {manifest.ref} already exists in {self.url} with different content;"
                " builds are immutable: publish under a new build id"
            )
        logger.info("build %s already published; nothing to upload", manifest.ref)
        return existing

    def _missing_blobs(self, entries: Sequence[FileEntry]) -> list[FileEntry]:
        if not entries:
            return []
        with ThreadPoolExecutor(max_workers=min(self.settings.workers, len(entries))) as pool:
            sizes = list(pool.map(lambda e: self._size(blob_key(e.sha256)), entries))
        missing = []
        for entry, size in zip(entries, sizes, strict=True):
            if size is None:
                missing.append(entry)
            elif size != entry.size:
                logger.warning("blob %s has %d bytes instead of %d; uploading it again", entry.sha256, size, entry.size)
                missing.append(entry)
        return missing

    def _upload_missing(
        self, engine_dir: Path, files: Sequence[FileEntry], *, verify: bool, progress: bool, label: str
    ) -> _BlobStats:
        unique: dict[str, FileEntry] = {}
        for entry in files:
            unique.setdefault(entry.sha256, entry)
        missing = self._missing_blobs(list(unique.values()))
        stats = _BlobStats(
            uploaded_blobs=len(missing),
            uploaded_bytes=sum(e.size for e in missing),
            reused_blobs=len(unique) - len(missing),
            reused_bytes=sum(e.size for e in unique.values()) - sum(e.size for e in missing),
        )
        logger.info("%s: %d blobs to upload (%d bytes), %d already stored", label, stats.uploaded_blobs,
                    stats.uploaded_bytes, stats.reused_blobs)
        if not missing:
            return stats
        cleanups: list[Callable[[], None]] = []
        with progress_bar(label, stats.uploaded_bytes, enabled=progress) as sink, TaskGroup(
            self.settings.workers
        ) as group:
            try:
                with self._backend_errors("upload"):
                    for entry in sorted(missing, key=lambda e: -e.size):
                        cleanup = self._schedule_upload(engine_dir / entry.path, entry, group, sink, verify=verify)
                        if cleanup is not None:
                            cleanups.append(cleanup)
                    group.wait()
            except BaseException:
                group.close()
                for cleanup in cleanups:
                    cleanup()
                raise
        return stats

    def _create_manifest(self, manifest: EngineManifest) -> bool:
        key = build_key(manifest.model, manifest.build_id)
        try:
            self._put(key, manifest.to_json(), if_absent=True)
        except PreconditionFailed:
            # Either a concurrent publisher of the same build or our own write whose response was lost.
            return self._existing_build(manifest) is None
        return True

    # ---- aliases -------------------------------------------------------------------------

    def set_alias(
        self, model: str, alias: str, build_id: str, *, expected: str | None | _AnyBuild = ANY
    ) -> AliasRecord:
        """Point ``model@alias`` at ``build_id`` by compare-and-swap.

        ``expected`` is the build id the caller believes the alias points to now (None: the alias
        must not exist); if it points elsewhere, StoreConflict names the expected and actual builds.
        With ``expected=ANY`` the move is retried until it wins.
        """
        _name(model, "model name")
        _name(alias, "alias")
        manifest = self._read_manifest(model, _name(build_id, "build id"))
        with self._writer_lock(f"alias {model}@{alias}"):
            if expected is ANY:
                self._move_alias(manifest, alias, only_if_newer=False)
                record = self.get_alias(model, alias)
                assert record is not None
                return record
            return self._swap_alias(model, alias, build_id, expected)

    def promote(self, ref: str | Ref, alias: str, *, expected: str | None | _AnyBuild = ANY) -> AliasMove:
        """Point ``alias`` of the ref's model at the build the ref resolves to (explicit, may move backwards)."""
        manifest = self.resolve(ref)
        _name(alias, "alias")
        with self._writer_lock(f"promote {manifest.ref} to {alias}"):
            if expected is ANY:
                return self._move_alias(manifest, alias, only_if_newer=False)
            before = self._read_alias(manifest.model, alias)[0]
            self._swap_alias(manifest.model, alias, manifest.build_id, expected)
            previous = before.build_id if before else None
            return AliasMove(
                model=manifest.model, alias=alias, previous=previous, build_id=manifest.build_id,
                moved=previous != manifest.build_id,
            )

    def move_alias(self, ref: str | Ref, alias: str, *, only_if_newer: bool = True, attempts: int = 8) -> AliasMove:
        """Move an alias, retrying after lost races; with ``only_if_newer`` never move it to an older build.

        This is the conflict-retry helper publish uses: after a StoreConflict it re-reads the alias
        and re-applies the move unless the alias now points to a build at least as new.
        """
        manifest = self.resolve(ref)
        _name(alias, "alias")
        with self._writer_lock(f"alias {manifest.model}@{alias}"):
            return self._move_alias(manifest, alias, only_if_newer=only_if_newer, attempts=attempts)

    def _move_alias(
        self, manifest: EngineManifest, alias: str, *, only_if_newer: bool, attempts: int = 8
    ) -> AliasMove:
        model, build_id = manifest.model, manifest.build_id
        for attempt in range(1, attempts + 1):
            current, _ = self._read_alias(model, alias)
            found = current.build_id if current else None
            if found == build_id:
                return AliasMove(model=model, alias=alias, previous=found, build_id=build_id, moved=False,
                                 note="already there")
            if only_if_newer and found is not None:
                try:
                    other = self._read_manifest(model, found)
                except (NotFound, IntegrityError):
                    other = None  # dangling or unreadable target: replace it
                if other is not None and other.sort_key() > manifest.sort_key():
                    return AliasMove(model=model, alias=alias, previous=found, build_id=found, moved=False,
                                     note=f"kept: {found} is newer")
            try:
                self._swap_alias(model, alias, build_id, found)
            except StoreConflict as exc:
                delay = min(2.0, 0.05 * 2**attempt) * (0.5 + random.random())
                logger.info("%s; retrying in %.2fs (attempt %d/%d)", exc, delay, attempt, attempts)
                time.sleep(delay)
                continue
            return AliasMove(model=model, alias=alias, previous=found, build_id=build_id, moved=True)
        raise StoreConflict(
            f"gave up moving alias {model}@{alias} to {build_id} after {attempts} lost races; retry later"
        )

    def _swap_alias(self, model: str, alias: str, build_id: str, expected: str | None) -> AliasRecord:
        current, version = self._read_alias(model, alias)
        found = current.build_id if current else None
        if found != expected:
            raise _alias_conflict(model, alias, expected, found)
        now = _now()
        event = AliasEvent(build_id=build_id, previous=found, at=now, by=_actor())
        history = [event, *(current.history if current else [])][:ALIAS_HISTORY]
        record = AliasRecord(
            model=model, alias=alias, build_id=build_id, updated_at=now, by=event.by,
            token=uuid.uuid4().hex, history=history,
        )
        data = record.model_dump_json(indent=2).encode() + b"\n"
        try:
            self._put(alias_key(model, alias), data, if_absent=version is None, if_version=version)
        except PreconditionFailed:
            after, _ = self._read_alias(model, alias)
            if after is not None and after.token == record.token:
                return after  # our own write landed; only its response was lost
            raise _alias_conflict(model, alias, expected, after.build_id if after else None) from None
        logger.info("alias %s@%s: %s -> %s", model, alias, found, build_id)
        return record

    # ---- pulling -------------------------------------------------------------------------

    def pull(self, ref: str | Ref, dest: Path, *, overwrite: bool = False, progress: bool = False) -> EngineManifest:
        """Download a build into ``dest`` atomically; every file is verified against its sha256 first.

        Files go to a staging directory next to ``dest`` (``.<name>.vlmforge-partial``) that keeps
        verified files and partial parts across interruptions, so a rerun resumes. The staging
        directory is renamed to ``dest`` only when complete. ``dest`` holding the same build is a
        no-op; holding anything else is an error unless ``overwrite``.
        """
        manifest = self.resolve(ref)
        dest = Path(dest).absolute()
        present = _read_marker(dest)
        if present is not None and present.model == manifest.model and present.build_id == manifest.build_id:
            logger.info("%s already holds %s", dest, manifest.ref)
            return manifest
        if (dest.exists() or dest.is_symlink()) and not overwrite and not _is_empty_dir(dest):
            holding = present.ref if present else "other files"
            raise StoreError(f"{dest} already exists (holding {holding}); use overwrite (--force) to replace it")
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = dest.parent / f".{dest.name}.vlmforge-partial"
        prior = _read_marker(staging)
        if staging.exists() and (prior is None or prior.ref != manifest.ref):
            shutil.rmtree(staging)
        staging.mkdir(exist_ok=True)
        (staging / MARKER).write_bytes(manifest.to_json())
        parts_dir = staging / ".vlmforge-tmp"
        parts_dir.mkdir(exist_ok=True)

        groups: dict[str, list[FileEntry]] = {}
        for entry in manifest.files:
            groups.setdefault(entry.sha256, []).append(entry)
        todo = [
            entries for entries in groups.values()
            if not all(_has_size(staging / e.path, e.size) for e in entries)
        ]
        total = sum(entries[0].size for entries in todo)
        logger.info("pulling %s: %d of %d blobs to fetch (%d bytes)", manifest.ref, len(todo), len(groups), total)
        with progress_bar(f"pull {manifest.ref}", total, enabled=progress) as sink, TaskGroup(
            self.settings.workers
        ) as group:
            with self._backend_errors("download"):
                for entries in sorted(todo, key=lambda es: -es[0].size):
                    part = parts_dir / entries[0].sha256
                    self._schedule_download(entries[0], part, group, sink, _placer(part, staging, entries))
                group.wait()
        shutil.rmtree(parts_dir)
        _remove_strays(staging, {e.path for e in manifest.files})
        if dest.exists() or dest.is_symlink():
            backup = dest.parent / f".{dest.name}.vlmforge-old-{uuid.uuid4().hex[:8]}"
            os.rename(dest, backup)
            os.rename(staging, dest)
            if backup.is_dir() and not backup.is_symlink():
                shutil.rmtree(backup)
            else:
                backup.unlink()
        else:
            os.rename(staging, dest)
        logger.info("pulled %s into %s (%d files verified)", manifest.ref, dest, len(manifest.files))
        return manifest

    # ---- retention -----------------------------------------------------------------------

    def gc(self, keep: int = 5, *, apply: bool = False, break_locks: bool = False) -> GcReport:
        """Keep the newest ``keep`` builds of each model plus every alias target; delete the rest.

        A dry run (default) only reports. With ``apply`` the gc lock is taken first (refused while
        a publish/promote is running; ``break_locks`` ignores writer locks, e.g. those left by a
        publisher killed on another host), manifests are deleted before the blobs only they use,
        and leftovers of interrupted uploads are removed.
        """
        if keep < 1:
            raise StoreError("gc --keep must be at least 1")
        if not apply:
            return self._gc(keep, apply=False)
        with self._gc_lock(break_locks=break_locks):
            return self._gc(keep, apply=True)

    def _gc(self, keep: int, *, apply: bool) -> GcReport:
        kept: list[GcBuild] = []
        deleted: list[GcBuild] = []
        dangling: list[str] = []
        refused: list[str] = []
        referenced: dict[str, int] = {}
        for model in sorted(self._children("models/")):
            ids = self._build_ids(model)
            manifests, bad = self._read_manifests(model, ids)
            refused.extend(key for key, _ in bad)
            targets = self._alias_targets(model)
            known = {m.build_id for m in manifests} | {key.rsplit("/", 1)[1][: -len(".json")] for key, _ in bad}
            dangling.extend(f"{model}@{a} -> {b}" for a, b in sorted(targets.items()) if b not in known)
            for rank, m in enumerate(sorted(manifests, key=EngineManifest.sort_key, reverse=True)):
                reasons = [f"alias {a}" for a, b in sorted(targets.items()) if b == m.build_id]
                if rank < keep:
                    reasons.insert(0, f"newest {rank + 1}/{keep}")
                item = GcBuild(model=model, build_id=m.build_id, created_at=m.created_at, reasons=reasons)
                if reasons:
                    kept.append(item)
                    for entry in m.files:
                        referenced[entry.sha256] = entry.size
                else:
                    item.reasons = [f"older than the newest {keep}, no alias"]
                    deleted.append(item)
        stored = {info.key.rsplit("/", 1)[1]: info.size for info in self._list("blobs/sha256/")}
        unreferenced = sorted(set(stored) - set(referenced))
        missing = sorted(set(referenced) - set(stored))
        for sha in missing:
            logger.error("blob %s is referenced by a kept build but missing from %s", sha, self.url)
        cleaned = 0
        if apply:
            self._delete_many([build_key(b.model, b.build_id) for b in deleted])
            self._delete_many([blob_key(sha) for sha in unreferenced])
            cleaned = self._cleanup_incomplete()
            logger.info("gc deleted %d builds and %d blobs", len(deleted), len(unreferenced))
        return GcReport(
            applied=apply,
            keep=keep,
            kept=kept,
            deleted=deleted,
            blobs_kept=len(stored) - len(unreferenced),
            bytes_kept=sum(size for sha, size in stored.items() if sha in referenced),
            blobs_deleted=len(unreferenced),
            bytes_deleted=sum(stored[sha] for sha in unreferenced),
            dangling_aliases=dangling,
            missing_blobs=missing,
            refused_manifests=refused,
            incomplete_cleaned=cleaned,
        )

    # ---- locks ---------------------------------------------------------------------------
    # Writers (publish, alias moves) and gc exclude each other with a Dekker-style protocol on
    # strongly consistent storage: each side first writes its own lock, then looks for the
    # other side's; at least one of two racing parties therefore sees the other and backs off.

    def _lock_info(self, kind: Literal["writer", "gc"], purpose: str) -> LockInfo:
        return LockInfo(
            kind=kind, purpose=purpose, host=socket.gethostname(), pid=os.getpid(), by=_actor(), created_at=_now()
        )

    def _read_lock(self, key: str) -> LockInfo | None:
        try:
            data, _ = self._get(key)
        except NotFound:
            return None
        try:
            return LockInfo.model_validate_json(data)
        except ValidationError:
            return LockInfo(kind="gc", purpose="unreadable lock", host="?", pid=0, by="?",
                            created_at=datetime.fromtimestamp(0, UTC))

    def _is_stale(self, info: LockInfo) -> bool:
        if _now() - info.created_at > self.lock_ttl:
            return True
        return info.host == socket.gethostname() and not pid_alive(info.pid)

    @contextmanager
    def _writer_lock(self, purpose: str) -> Iterator[None]:
        key = f"{WRITER_LOCKS}{uuid.uuid4().hex}.json"
        deadline = time.monotonic() + self.lock_wait
        while True:
            self._put(key, self._lock_info("writer", purpose).model_dump_json().encode(), if_absent=True)
            holder = self._read_lock(GC_LOCK)
            if holder is None or self._is_stale(holder):
                break
            self._delete(key)
            if time.monotonic() > deadline:
                raise StoreError(
                    f"garbage collection is running on {self.url} (by {holder.by}, pid {holder.pid},"
                    f" since {holder.created_at:%Y-%m-%d %H:%M:%S}Z); retry when it is done"
                )
            logger.info("waiting for gc by %s to finish before %s", holder.by, purpose)
            time.sleep(1.0)
        try:
            yield
        finally:
            self._delete(key)

    @contextmanager
    def _gc_lock(self, *, break_locks: bool = False) -> Iterator[None]:
        info = self._lock_info("gc", "gc")
        data = info.model_dump_json().encode()
        try:
            self._put(GC_LOCK, data, if_absent=True)
        except PreconditionFailed:
            holder = self._read_lock(GC_LOCK)
            if holder is not None and not self._is_stale(holder):
                raise StoreConflict(
                    f"another gc is running on {self.url} (by {holder.by}, pid {holder.pid},"
                    f" since {holder.created_at:%Y-%m-%d %H:%M:%S}Z)"
                ) from None
            logger.warning("breaking stale gc lock of %s", holder.by if holder else "?")
            self._delete(GC_LOCK)
            try:
                self._put(GC_LOCK, data, if_absent=True)
            except PreconditionFailed:
                raise StoreConflict(f"another gc just started on {self.url}") from None
        try:
            active = []
            for obj in self._list(WRITER_LOCKS):
                writer = self._read_lock(obj.key)
                if writer is None:
                    continue
                if break_locks or self._is_stale(writer):
                    logger.warning("removing stale writer lock %s (%s by %s)", obj.key, writer.purpose, writer.by)
                    self._delete(obj.key)
                else:
                    active.append(writer)
            if active:
                first = active[0]
                raise StoreConflict(
                    f"{len(active)} publish/alias operation(s) in progress on {self.url} (e.g. {first.purpose}"
                    f" by {first.by}, pid {first.pid}); retry gc when they are done"
                )
            yield
        finally:
            self._delete(GC_LOCK)


def _alias_conflict(model: str, alias: str, expected: str | None, actual: str | None) -> StoreConflict:
    return StoreConflict(
        f"alias {model}@{alias} conflict: expected it to point to {expected or '(no alias yet)'}, but it points"
        f" to {actual or '(nothing: alias absent)'} (another writer moved it); re-read it and retry"
    )


def _read_marker(directory: Path) -> EngineManifest | None:
    try:
        return EngineManifest.from_json((directory / MARKER).read_bytes(), where=str(directory / MARKER))
    except (OSError, IntegrityError):
        return None


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def _has_size(path: Path, size: int) -> bool:
    try:
        return path.is_file() and not path.is_symlink() and path.stat().st_size == size
    except OSError:
        return False


def _placer(part: Path, staging: Path, entries: list[FileEntry]) -> Callable[[], None]:
    """Move a verified blob into place for every path that has its content."""

    def place() -> None:
        *copies, last = entries
        for entry in copies:
            target = staging / entry.path
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(part, target)
        target = staging / last.path
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(part, target)

    return place


def _remove_strays(staging: Path, wanted: set[str]) -> None:
    """Delete files in a staging directory that the manifest does not list (left by an older attempt)."""
    for dirpath, dirnames, filenames in os.walk(staging, topdown=False):
        here = Path(dirpath)
        for name in filenames:
            path = here / name
            rel = path.relative_to(staging).as_posix()
            if rel != MARKER and rel not in wanted:
                path.unlink()
        for name in dirnames:
            sub = here / name
            if sub.is_symlink():
                sub.unlink()
            elif not any(sub.iterdir()):
                sub.rmdir()
