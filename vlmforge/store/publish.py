"""Publishing: upload an engine directory's missing blobs, check they are all there, write the manifest last."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from vlmforge.artifacts.manifest import EngineManifest, FileEntry
from vlmforge.errors import IntegrityError, NotFound, StoreConflict, StoreError
from vlmforge.store.aliases import AliasOps
from vlmforge.store.backend import PreconditionFailed
from vlmforge.store.keys import DEFAULT_ALIAS, blob_key, build_key, checked_name
from vlmforge.store.results import BlobStats, PublishResult
from vlmforge.store.transfer import ProgressSink, TaskGroup, engine_files, hash_file, progress_bar

logger = logging.getLogger(__name__)


class PublishOps(AliasOps):
    """``publish`` and the upload machinery behind it."""

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
        Publishing a build that is already stored (same build id and fingerprint, e.g. a rerun after
        a crash, or a second publish of the same inputs in the same second) uploads nothing and
        returns the stored build. Right before the manifest is written, every blob it references is
        checked to exist. Aliases only move forward: an alias already pointing to a newer build (by
        ``created_at``) is kept. The first publish into an empty location creates the store there.
        """
        started = time.monotonic()
        engine_dir = Path(engine_dir)
        if not engine_dir.is_dir():
            raise StoreError(f"engine directory {engine_dir} does not exist or is not a directory")
        for alias in aliases:
            checked_name(alias, "alias")
        label = f"push {manifest.ref}"
        self._ensure_store(f"publish {manifest.ref}")
        with self._writer_lock(f"publish {manifest.ref}") as lease:
            stats = BlobStats()
            hashed = time.monotonic()
            existing = self._existing_build(manifest)  # already there: the local files are not needed
            if existing is not None:
                manifest, created = existing, False
            else:
                if manifest.files:
                    self._check_local_files(engine_dir, manifest.files)
                    stats = self._upload_missing(engine_dir, manifest.files, verify=True, progress=progress,
                                                 label=label)
                else:
                    files, stats, hashed = self._hash_and_upload(engine_dir, progress=progress, label=label)
                    manifest = manifest.with_files(files)
                lease.check()
                self._check_blobs_present(manifest)
                manifest, created = self._create_manifest(manifest)
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

    def _existing_build(self, manifest: EngineManifest) -> EngineManifest | None:
        """The stored build with this manifest's build id if it is the same build (same fingerprint), else None.

        Build ids are ``<second>-<fingerprint[:8]>``: two publishes of the same inputs in the same second get
        the same id, with different ``created_at`` and possibly different bytes (engine builds are not
        byte-reproducible). The first one stored is the build; the second is an idempotent rerun. A build id
        held by a build with another fingerprint is a conflict: builds are immutable.
        """
        try:
            existing = self._read_manifest(manifest.model, manifest.build_id)
        except NotFound:
            return None
        if existing.fingerprint != manifest.fingerprint:
            raise StoreConflict(
                f"build {manifest.ref} already exists in {self.url} with another fingerprint"
                f" ({existing.fingerprint[:12]}, not {manifest.fingerprint[:12]}); builds are immutable: publish"
                " under a new build id"
            )
        if existing == manifest:
            logger.info("build %s already published; nothing to upload", manifest.ref)
        else:
            logger.info("build %s of the same inputs (fingerprint %s) is already published; using it",
                        manifest.ref, manifest.fingerprint[:12])
        return existing

    def _create_manifest(self, manifest: EngineManifest) -> tuple[EngineManifest, bool]:
        """Write the manifest create-only; (the stored build, whether this call created it)."""
        try:
            self._put(build_key(manifest.model, manifest.build_id), manifest.to_json(), if_absent=True)
        except PreconditionFailed:
            # A concurrent publisher of the same build won, or our own write landed and its response was lost.
            existing = self._existing_build(manifest)
            if existing is None:
                raise StoreError(f"the manifest of {manifest.ref} could not be written to {self.url}") from None
            return existing, existing == manifest
        return manifest, True

    def _check_blobs_present(self, manifest: EngineManifest) -> None:
        """Refuse to write a manifest whose blobs are not all stored (something deleted them meanwhile)."""
        unique = {entry.sha256: entry for entry in manifest.files}
        missing = self._missing_blobs(list(unique.values()))
        if missing:
            first = missing[0]
            raise IntegrityError(
                f"{len(missing)} blob(s) of {manifest.ref} are missing from {self.url} right before its manifest"
                f" would be written (e.g. {first.path}, sha256 {first.sha256[:12]}): something deleted them"
                " meanwhile; nothing was published: publish again"
            )

    def _hash_and_upload(
        self, engine_dir: Path, *, progress: bool, label: str
    ) -> tuple[list[FileEntry], BlobStats, float]:
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
        stats = BlobStats()
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
                logger.warning("blob %s has %d bytes instead of %d", entry.sha256, size, entry.size)
                missing.append(entry)
        return missing

    def _upload_missing(
        self, engine_dir: Path, files: Sequence[FileEntry], *, verify: bool, progress: bool, label: str
    ) -> BlobStats:
        unique: dict[str, FileEntry] = {}
        for entry in files:
            unique.setdefault(entry.sha256, entry)
        missing = self._missing_blobs(list(unique.values()))
        stats = BlobStats(
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
