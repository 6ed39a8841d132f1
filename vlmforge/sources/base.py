"""The source interface, file hashing and the integrity checks every fetch runs."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import threading
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from vlmforge.artifacts.manifest import FileEntry
from vlmforge.errors import SourceError, SourceMoved
from vlmforge.specs.schema import SourceURI
from vlmforge.system.hashing import sha256_and_size

CHUNK = 8 * 1024 * 1024
CHECKSUM_FILE = "SHA256SUMS"


class FetchedSource(BaseModel):
    """A fetched, verified checkpoint in a local directory."""

    uri: str
    revision: str
    """Exact revision: hf commit sha, s3 ETag digest, or content digest (file://, tiny://)."""
    path: str
    files: list[FileEntry]


def sha256_file(path: Path) -> str:
    return _sha256_and_size(path)[0]


def _sha256_and_size(path: Path, also: Any = None) -> tuple[str, int]:
    """sha256 hex of a file and the bytes read (one pass; :func:`vlmforge.system.hashing.sha256_and_size`).
    ``also``: another hashlib object fed the same bytes (an S3 download's MD5 check shares the read)."""
    return sha256_and_size(path, CHUNK, also=also)


class DigestCache:
    """The sha256 of every file this build has read, by (device, inode, size, modification time): the same file met
    again, under another path or as a hard link a later stage made (the fetched checkpoint, the LLM engine assembled
    into the engine folder), is not read again. A file whose size, inode or modification time changed is read
    again. A file rewritten in place at the same size within its file system's timestamp resolution would not be:
    stage outputs are written once and never touched after, and a source changing under a fetch is caught by its
    before/after comparison. Thread-safe; counts what it read and what it reused.
    """

    def __init__(self) -> None:
        self._known: dict[tuple[int, int, int, int], str] = {}
        self._lock = threading.Lock()
        self.hashed_bytes = 0
        self.reused_bytes = 0

    def sha256(self, path: Path, *, also: Any = None) -> tuple[str, int]:
        """(sha256 hex, size) of ``path``, read only if this cache has not seen the file as it is now. ``also``:
        another hashlib object to feed the file's bytes; it is fed whether or not the sha256 was known."""
        before = path.stat()
        key = (before.st_dev, before.st_ino, before.st_size, before.st_mtime_ns)
        with self._lock:
            known = self._known.get(key)
            if known is not None:
                self.reused_bytes += before.st_size
        if known is not None:
            if also is not None:
                _sha256_and_size(path, also)
            return known, before.st_size
        digest, size = _sha256_and_size(path, also)
        after = path.stat()
        with self._lock:
            self.hashed_bytes += size
            if (after.st_dev, after.st_ino, after.st_size, after.st_mtime_ns) == key and size == before.st_size:
                self._known[key] = digest  # unchanged while it was read
        return digest, size


def hash_workers(count: int) -> int:
    """Threads to hash ``count`` files with: one per core, at most 8 (a disk or page cache feeds about that many)."""
    return max(1, min(count, os.cpu_count() or 1, 8))


def hash_tree(root: Path, *, skip: frozenset[str] = frozenset({CHECKSUM_FILE}),
              digests: DigestCache | None = None) -> list[FileEntry]:
    """Every regular file under ``root`` (sorted), with its sha256 and size: files hashed in parallel (largest
    first), each read at most once per ``digests``."""
    cache = digests or DigestCache()
    paths = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel in skip or rel.startswith(".cache/"):
            continue
        paths.append((rel, path))
    if not paths:
        return []
    with ThreadPoolExecutor(max_workers=hash_workers(len(paths)), thread_name_prefix="hash") as pool:
        largest_first = sorted(paths, key=lambda item: -item[1].stat().st_size)
        found = dict(zip((rel for rel, _ in largest_first), pool.map(lambda item: cache.sha256(item[1]), largest_first),
                         strict=True))
    return [FileEntry(path=rel, sha256=found[rel][0], size=found[rel][1]) for rel, _ in paths]


def tree_digest(entries: list[FileEntry]) -> str:
    """One digest for a whole tree: sha256 over 'sha256  size  path' lines."""
    lines = "".join(f"{e.sha256}  {e.size}  {e.path}\n" for e in sorted(entries, key=lambda e: e.path))
    return hashlib.sha256(lines.encode()).hexdigest()


def verify_tree(root: Path, expected: list[FileEntry], *, digests: DigestCache | None = None) -> None:
    """Raise :class:`SourceError` naming the first missing, resized or altered file (hashed in parallel)."""
    for entry in expected:
        path = root / entry.path
        if not path.is_file():
            raise SourceError(f"missing file {entry.path} in {root}")
        size = path.stat().st_size
        if size != entry.size:
            raise SourceError(f"corrupt file {entry.path}: {size} bytes, expected {entry.size}")
    cache = digests or DigestCache()
    with ThreadPoolExecutor(max_workers=hash_workers(len(expected)), thread_name_prefix="verify") as pool:
        found = list(pool.map(lambda entry: cache.sha256(root / entry.path)[0], expected))
    for entry, digest in zip(expected, found, strict=True):
        if digest != entry.sha256:
            raise SourceError(f"corrupt file {entry.path}: sha256 {digest[:12]}..., expected {entry.sha256[:12]}...")


def check_safetensors(path: Path, rel: str) -> None:
    """Structural check of a safetensors file: header parses and the data size matches it."""
    size = path.stat().st_size
    try:
        with path.open("rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            if header_len <= 0 or 8 + header_len > size:
                raise ValueError(f"header length {header_len} does not fit a {size}-byte file")
            header = json.loads(handle.read(header_len))
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise SourceError(f"corrupt weights {rel}: not a readable safetensors file ({exc})") from None
    end = max((meta["data_offsets"][1] for key, meta in header.items() if key != "__metadata__"), default=0)
    if 8 + header_len + end != size:
        raise SourceError(
            f"corrupt weights {rel}: the header describes {8 + header_len + end} bytes but the file has {size} "
            "(truncated or padded)"
        )


def check_checkpoint(root: Path, entries: list[FileEntry]) -> None:
    """Integrity checks every fetched checkpoint gets: SHA256SUMS when present, safetensors structure, a config."""
    sums = root / CHECKSUM_FILE
    if sums.is_file():
        by_path = {entry.path: entry for entry in entries}
        for line_no, line in enumerate(sums.read_text().splitlines(), 1):
            if not line.strip():
                continue
            digest, _, rel = line.strip().partition("  ")
            rel = rel.lstrip("*")
            entry = by_path.get(rel)
            if entry is None:
                raise SourceError(f"{CHECKSUM_FILE}:{line_no} lists {rel}, which the checkpoint lacks")
            if entry.sha256 != digest:
                raise SourceError(f"corrupt file {rel}: sha256 {entry.sha256[:12]}... but {CHECKSUM_FILE} says {digest[:12]}...")
    for entry in entries:
        if entry.path.endswith(".safetensors"):
            check_safetensors(root / entry.path, entry.path)
    if not (root / "config.json").is_file():
        raise SourceError(f"{root} has no config.json: not a Hugging Face checkpoint directory")


class Source(ABC):
    """Where a checkpoint comes from. ``digests``: the build's file digests (a file hashed by one step of the build
    is not read again by the next)."""

    def __init__(self, uri: SourceURI, digests: DigestCache | None = None) -> None:
        self.uri = uri
        self.digests = digests or DigestCache()

    @abstractmethod
    def resolve_revision(self) -> str:
        """The exact current revision, as cheaply as the source allows (used by the watcher)."""

    def revision_key(self) -> str | None:
        """A cheap key that determines :meth:`resolve_revision`'s answer exactly, for a source whose revision is a
        pure function of code on this machine (``tiny://``); None for the others (their revision is what they hold
        now: a directory's content, a bucket's listing, a hub's commit)."""
        return None

    @abstractmethod
    def fetch(self, dest: Path, revision: str | None = None) -> FetchedSource:
        """Download into ``dest`` (an empty directory), verify, and describe what was fetched.

        ``revision``: the one :meth:`resolve_revision` gave. The fetch gets exactly it (hf: that commit) or raises
        :class:`SourceMoved` when the source no longer holds it: a build keys its download by the resolved revision,
        and another revision's bytes stored under that key would be reused as if they were it."""

    def _check_pinned(self, revision: str | None, found: str) -> None:
        if revision is not None and found != revision:
            raise SourceMoved(f"{self.uri} moved on since its revision was resolved ({revision} -> {found}): "
                              "resolve it again")

    def _finish(self, dest: Path, revision: str) -> FetchedSource:
        entries = hash_tree(dest, digests=self.digests)
        check_checkpoint(dest, entries)
        return FetchedSource(uri=str(self.uri), revision=revision, path=str(dest), files=entries)


def link_or_copy(src: str, dst: str) -> str:
    """A hard link where the file system allows one, else a copy (``shutil.copytree``'s copy_function)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst
