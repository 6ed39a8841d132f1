"""Local engine directories that pulls fill: the pull marker, checks of what is there, free space, placing files."""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from vlmforge.artifacts.manifest import EngineManifest, FileEntry
from vlmforge.errors import IntegrityError, StoreError
from vlmforge.store.keys import MARKER, SUBSET
from vlmforge.store.transfer import hash_file


def read_marker(directory: Path) -> EngineManifest | None:
    """The manifest a pulled directory says it holds, or None (no marker, or an unreadable one)."""
    try:
        return EngineManifest.from_json((directory / MARKER).read_bytes(), where=str(directory / MARKER))
    except (OSError, IntegrityError):
        return None


def read_subset(directory: Path) -> frozenset[str]:
    """The top-level folders a pulled directory was pulled without (empty: it holds the whole build). An unreadable
    record is taken as everything left out, so nothing is reused on its word and the files are checked again."""
    try:
        names = json.loads((directory / SUBSET).read_text())
    except FileNotFoundError:
        return frozenset()
    except (OSError, ValueError):
        return frozenset({"*"})
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        return frozenset({"*"})
    return frozenset(names)


def write_subset(directory: Path, exclude: frozenset[str]) -> None:
    """Record which top-level folders ``directory`` is pulled without (none: no record)."""
    if exclude:
        (directory / SUBSET).write_text(json.dumps(sorted(exclude)) + "\n")
    else:
        (directory / SUBSET).unlink(missing_ok=True)


def selected(files: Sequence[FileEntry], exclude: frozenset[str]) -> list[FileEntry]:
    """The entries of ``files`` outside the top-level folders ``exclude`` names."""
    return [entry for entry in files if "/" not in entry.path or entry.path.split("/", 1)[0] not in exclude]


def is_empty_dir(path: Path) -> bool:
    """Whether ``path`` is a real (not symlinked) directory with nothing in it."""
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def file_problem(root: Path, entry: FileEntry, *, rehash: bool, chunk: int) -> str | None:
    """What is wrong with ``entry``'s file under ``root`` (missing, not a regular file inside ``root``, wrong
    size, or with ``rehash`` wrong sha256), or None if it is intact."""
    path = root / entry.path
    try:
        st = path.lstat()
    except (FileNotFoundError, NotADirectoryError):
        return f"{entry.path} is missing"
    if not stat.S_ISREG(st.st_mode) or not path.resolve().is_relative_to(root.resolve()):
        return f"{entry.path} is not a regular file inside {root}"
    if st.st_size != entry.size:
        return f"{entry.path} has {st.st_size} bytes, not {entry.size}"
    if rehash and hash_file(path, chunk)[0] != entry.sha256:
        return f"{entry.path} does not match its sha256"
    return None


def file_problems(root: Path, files: Sequence[FileEntry], *, rehash: bool, chunk: int, workers: int) -> list[str]:
    """Problems of every listed file under ``root`` (re-hashed in parallel with ``rehash``), in manifest order."""
    if not files:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(files)))) as pool:
        found = list(pool.map(lambda e: file_problem(root, e, rehash=rehash, chunk=chunk), files))
    return [problem for problem in found if problem is not None]


def human_bytes(n: int) -> str:
    """``1.5 GiB``-style size for messages."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024 or unit == "PiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def check_free_space(path: Path, needed: int, what: str) -> None:
    """Refuse ``what`` before it starts if the filesystem holding ``path`` has less than ``needed`` bytes free."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if needed > free:
        raise StoreError(
            f"{what} needs {human_bytes(needed)} ({needed} bytes) in {existing}, which has only {human_bytes(free)}"
            " free; free some space there or pull to another destination"
        )


def allocated(path: Path) -> int:
    """Bytes already allocated on disk for ``path`` (0 if absent): a resumed partial file needs only the rest."""
    try:
        return path.stat().st_blocks * 512
    except OSError:
        return 0


def placer(part: Path, staging: Path, entries: list[FileEntry]) -> Callable[[], None]:
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


def remove_strays(staging: Path, wanted: set[str]) -> None:
    """Delete files in a staging directory that the manifest does not list (left by an older attempt)."""
    for dirpath, dirnames, filenames in os.walk(staging, topdown=False):
        here = Path(dirpath)
        for name in filenames:
            path = here / name
            rel = path.relative_to(staging).as_posix()
            if rel not in (MARKER, SUBSET) and rel not in wanted:
                path.unlink()
        for name in dirnames:
            sub = here / name
            if sub.is_symlink():
                sub.unlink()
            elif not any(sub.iterdir()):
                sub.rmdir()
