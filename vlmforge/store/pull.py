"""Pulling: download a build into a directory atomically, verified, resumable; re-check a copy that is reused."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import uuid
from pathlib import Path

from vlmforge.artifacts.manifest import EngineManifest, FileEntry
from vlmforge.errors import StoreError
from vlmforge.store.engine_dir import (
    allocated,
    check_free_space,
    file_problem,
    file_problems,
    is_empty_dir,
    placer,
    read_marker,
    remove_strays,
)
from vlmforge.store.identity import StoreIdentity
from vlmforge.store.keys import MARKER
from vlmforge.store.reading import StoreReader
from vlmforge.store.refs import Ref
from vlmforge.store.results import PullCheck, PullResult
from vlmforge.store.transfer import TaskGroup, progress_bar

logger = logging.getLogger(__name__)

_DISK_ERRORS = (errno.EFBIG, errno.ENOSPC, errno.EDQUOT)


class PullOps(StoreReader, StoreIdentity):
    """``pull``: the store to a local engine directory."""

    def pull(
        self, ref: str | Ref, dest: Path, *, overwrite: bool = False, progress: bool = False, verify: bool = False
    ) -> EngineManifest:
        """Download a build into ``dest`` (see :meth:`pull_engine`); returns its manifest."""
        return self.pull_engine(ref, dest, overwrite=overwrite, progress=progress, verify=verify).manifest

    def pull_engine(
        self, ref: str | Ref, dest: Path, *, overwrite: bool = False, progress: bool = False, verify: bool = False
    ) -> PullResult:
        """Download a build into ``dest`` atomically; every downloaded file is checked against its sha256.

        If ``dest`` already holds this build (its ``.vlmforge-manifest.json`` says so), every file is checked
        for presence and size (``verify``: re-hashed) before it is reused; a damaged copy is pulled again.
        Files go to a staging directory next to ``dest`` (``.<name>.vlmforge-partial``) that keeps
        finished files and partial parts across interruptions, so a rerun resumes; it is renamed to
        ``dest`` only when complete. ``dest`` holding anything else is an error unless ``overwrite``.
        Free space is checked before anything is downloaded. The result says what was checked how.
        """
        self._require_store(f"pull {ref}")
        manifest = self.resolve(ref)
        dest = Path(dest).absolute()
        chunk, workers = self.settings.io_chunk, self.settings.workers
        present = read_marker(dest)
        repaired: list[str] = []
        if present is not None and (present.model, present.build_id) == (manifest.model, manifest.build_id):
            repaired = file_problems(dest, manifest.files, rehash=verify, chunk=chunk, workers=workers)
            if not repaired:
                how = "re-hashed" if verify else "present with the expected sizes"
                logger.info("%s already holds %s: %d files %s", dest, manifest.ref, len(manifest.files), how)
                return PullResult(manifest=manifest, dest=str(dest), reused=True,
                                  check=PullCheck.SHA256 if verify else PullCheck.SIZES)
            logger.warning("%s holds a damaged copy of %s (%s); pulling it again", dest, manifest.ref,
                           "; ".join(repaired[:3]))
        elif (dest.exists() or dest.is_symlink()) and not overwrite and not is_empty_dir(dest):
            holding = present.ref if present else "other files"
            raise StoreError(f"{dest} already exists (holding {holding}); use overwrite (--force) to replace it")

        staging = dest.parent / f".{dest.name}.vlmforge-partial"
        parts_dir = staging / ".vlmforge-tmp"
        prior = read_marker(staging)
        resumable = staging.is_dir() and prior is not None and prior.ref == manifest.ref
        groups: dict[str, list[FileEntry]] = {}
        for entry in manifest.files:
            groups.setdefault(entry.sha256, []).append(entry)
        kept = {e.path for e in manifest.files if resumable and file_problem(staging, e, rehash=verify, chunk=chunk)
                is None}
        todo = [entries for entries in groups.values() if not all(e.path in kept for e in entries)]
        needed = sum(e.size for entries in todo for e in entries)  # every path of a blob to fetch is rewritten
        needed -= sum(allocated(parts_dir / entries[0].sha256) for entries in todo) if resumable else 0
        check_free_space(dest.parent, max(needed, 0), f"pulling {manifest.ref}")

        if staging.exists() and not resumable:
            shutil.rmtree(staging)
        staging.mkdir(parents=True, exist_ok=True)
        (staging / MARKER).write_bytes(manifest.to_json())
        parts_dir.mkdir(exist_ok=True)
        for entries in todo:
            for e in entries:
                (staging / e.path).unlink(missing_ok=True)  # damaged leftovers (re-hash) are fetched again

        total = sum(entries[0].size for entries in todo)
        logger.info("pulling %s: %d of %d blobs to fetch (%d bytes)", manifest.ref, len(todo), len(groups), total)
        try:
            with (progress_bar(f"pull {manifest.ref}", total, enabled=progress) as sink, TaskGroup(workers) as group,
                  self._backend_errors("download")):
                for entries in sorted(todo, key=lambda es: -es[0].size):
                    part = parts_dir / entries[0].sha256
                    self._schedule_download(entries[0], part, group, sink, placer(part, staging, entries))
                group.wait()
        except OSError as exc:
            if exc.errno in _DISK_ERRORS:
                raise StoreError(f"cannot write {manifest.ref} into {staging}: {exc.strerror}") from None
            raise
        shutil.rmtree(parts_dir)
        remove_strays(staging, {e.path for e in manifest.files})
        _swap_into_place(staging, dest)
        downloaded = sum(len(entries) for entries in todo)
        resumed = len(manifest.files) - downloaded
        logger.info("pulled %s into %s: %d files downloaded (sha256 checked), %d kept from an interrupted pull (%s)",
                    manifest.ref, dest, downloaded, resumed, "re-hashed" if verify else "sizes checked")
        return PullResult(
            manifest=manifest, dest=str(dest), reused=False,
            check=PullCheck.SHA256 if verify or resumed == 0 else PullCheck.SIZES,
            downloaded_files=downloaded, downloaded_bytes=total, resumed_files=resumed, repaired=repaired,
        )


def _swap_into_place(staging: Path, dest: Path) -> None:
    """Rename the complete staging directory to ``dest``, moving what was there aside first."""
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
