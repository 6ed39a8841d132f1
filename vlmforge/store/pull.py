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
    read_subset,
    remove_strays,
    selected,
    write_subset,
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
        self, ref: str | Ref, dest: Path, *, overwrite: bool = False, progress: bool = False, verify: bool = False,
        exclude: frozenset[str] = frozenset(),
    ) -> EngineManifest:
        """Download a build into ``dest`` (see :meth:`pull_engine`); returns its manifest."""
        return self.pull_engine(ref, dest, overwrite=overwrite, progress=progress, verify=verify,
                                exclude=exclude).manifest

    def pull_engine(
        self, ref: str | Ref, dest: Path, *, overwrite: bool = False, progress: bool = False, verify: bool = False,
        exclude: frozenset[str] = frozenset(),
    ) -> PullResult:
        """Download a build into ``dest`` atomically; every downloaded file is checked against its sha256.

        If ``dest`` already holds this build (its ``.vlmforge-manifest.json`` says so), every file is checked
        for presence and size (``verify``: re-hashed) before it is reused; a damaged copy is pulled again.
        Files go to a staging directory next to ``dest`` (``.<name>.vlmforge-partial``) that keeps
        finished files and partial parts across interruptions, so a rerun resumes; it is renamed to
        ``dest`` only when complete. ``dest`` holding anything else is an error unless ``overwrite``.
        Free space is checked before anything is downloaded. The result says what was checked how.

        ``exclude``: top-level folders of the build to leave out (a deploy backend takes only what it reads); the
        directory records them (:data:`~vlmforge.store.keys.SUBSET`), so a reuse checks only the files this pull
        needs, and a later pull that needs more keeps what is there (hard links into the staging directory, checked
        like a resumed pull's files) and fetches the rest. A damaged copy is pulled again whole, as before.
        """
        self._require_store(f"pull {ref}")
        exclude = check_exclude(exclude)
        manifest = self.resolve(ref)
        dest = Path(dest).absolute()
        chunk, workers = self.settings.io_chunk, self.settings.workers
        present = read_marker(dest)
        repaired: list[str] = []
        seed: Path | None = None
        if present is not None and (present.model, present.build_id) == (manifest.model, manifest.build_id):
            held = read_subset(dest)
            needed = selected(manifest.files, exclude)
            if held <= exclude:  # it holds every file this pull needs: check those
                repaired = file_problems(dest, needed, rehash=verify, chunk=chunk, workers=workers)
                if not repaired:
                    how = "re-hashed" if verify else "present with the expected sizes"
                    logger.info("%s already holds %s: %d files %s", dest, manifest.ref, len(needed), how)
                    return PullResult(manifest=manifest, dest=str(dest), reused=True,
                                      check=PullCheck.SHA256 if verify else PullCheck.SIZES, excluded=sorted(held))
                logger.warning("%s holds a damaged copy of %s (%s); pulling it again", dest, manifest.ref,
                               "; ".join(repaired[:3]))
            else:  # an intact part: start from it (its files checked as a resumed pull's), fetch the rest
                logger.info("%s holds %s without %s; fetching what is missing", dest, manifest.ref,
                            ", ".join(f"{name}/" for name in sorted(held - exclude)))
                seed = dest
            exclude = exclude & held  # keep what it holds, add what this pull needs
        elif (dest.exists() or dest.is_symlink()) and not overwrite and not is_empty_dir(dest):
            holding = present.ref if present else "other files"
            raise StoreError(f"{dest} already exists (holding {holding}); use overwrite (--force) to replace it")

        staging = dest.parent / f".{dest.name}.vlmforge-partial"
        parts_dir = staging / ".vlmforge-tmp"
        prior = read_marker(staging)
        resumable = staging.is_dir() and prior is not None and prior.ref == manifest.ref
        if seed is not None and not resumable:
            resumable = _seed(staging, seed, manifest)
        files = selected(manifest.files, exclude)
        groups: dict[str, list[FileEntry]] = {}
        for entry in files:
            groups.setdefault(entry.sha256, []).append(entry)
        kept = {e.path for e in files if resumable and file_problem(staging, e, rehash=verify, chunk=chunk)
                is None}
        todo = [entries for entries in groups.values() if not all(e.path in kept for e in entries)]
        needed = sum(e.size for entries in todo for e in entries)  # every path of a blob to fetch is rewritten
        needed -= sum(allocated(parts_dir / entries[0].sha256) for entries in todo) if resumable else 0
        check_free_space(dest.parent, max(needed, 0), f"pulling {manifest.ref}")

        if staging.exists() and not resumable:
            shutil.rmtree(staging)
        staging.mkdir(parents=True, exist_ok=True)
        (staging / MARKER).write_bytes(manifest.to_json())
        write_subset(staging, exclude)
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
        remove_strays(staging, {e.path for e in files})
        _swap_into_place(staging, dest)
        downloaded = sum(len(entries) for entries in todo)
        resumed = len(files) - downloaded
        logger.info("pulled %s into %s: %d files downloaded (sha256 checked), %d kept from an interrupted or partial "
                    "pull (%s)", manifest.ref, dest, downloaded, resumed, "re-hashed" if verify else "sizes checked")
        return PullResult(
            manifest=manifest, dest=str(dest), reused=False,
            check=PullCheck.SHA256 if verify or resumed == 0 else PullCheck.SIZES,
            downloaded_files=downloaded, downloaded_bytes=total, resumed_files=resumed, repaired=repaired,
            excluded=sorted(exclude),
        )


def check_exclude(exclude: frozenset[str]) -> frozenset[str]:
    """``exclude`` as a frozenset of top-level folder names, or a StoreError naming the bad one."""
    names = frozenset(exclude)
    for name in sorted(names):
        if not name or "/" in name or "*" in name or name in (".", "..") or name.startswith(".vlmforge"):
            raise StoreError(f"cannot leave out {name!r}: exclude takes top-level folder names of a build (hf, llm, "
                             "vision, ...)")
    return names


def _seed(staging: Path, dest: Path, manifest: EngineManifest) -> bool:
    """Start ``staging`` from the files ``dest`` holds of ``manifest`` (hard links: nothing copied), so a pull that
    needs more, or repairs a damaged copy, fetches only what is missing or wrong; the files are checked as a resumed
    pull's are. False where links cannot be made (the pull starts afresh)."""
    if staging.exists():
        shutil.rmtree(staging)
    try:
        for entry in manifest.files:
            source = dest / entry.path
            if source.is_file() and not source.is_symlink():
                (staging / entry.path).parent.mkdir(parents=True, exist_ok=True)
                os.link(source, staging / entry.path)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        return False
    (staging / MARKER).write_bytes(manifest.to_json())
    return True


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
