"""file:// and plain-path sources: a checkpoint directory on this machine, copied and content-addressed."""

from __future__ import annotations

import shutil
from pathlib import Path

from vlmforge.errors import SourceError
from vlmforge.sources.base import FetchedSource, Source, hash_tree, link_or_copy, tree_digest


class LocalSource(Source):
    """A local directory; its revision is the digest of its content."""

    @property
    def root(self) -> Path:
        return Path(self.uri.location).expanduser()

    def _check(self) -> None:
        if not self.root.is_dir():
            raise SourceError(f"source directory not found: {self.root}")

    def resolve_revision(self) -> str:
        self._check()
        return "sha256:" + tree_digest(hash_tree(self.root, digests=self.digests))

    def fetch(self, dest: Path, revision: str | None = None) -> FetchedSource:
        self._check()
        before = hash_tree(self.root, digests=self.digests)  # read once: resolve_revision's hashes, if it ran
        self._check_pinned(revision, "sha256:" + tree_digest(before))
        # Hard links where the work dir shares the source's file system (a 14 GB checkpoint costs no space, and its
        # digests carry over: the same inodes); copies are read again. The fetched tree is verified against the
        # source's hashes either way, and again on reuse.
        shutil.copytree(self.root, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".cache", ".git"),
                        copy_function=link_or_copy)
        fetched = self._finish(dest, "sha256:" + tree_digest(before))
        if {(e.path, e.sha256) for e in fetched.files} != {(e.path, e.sha256) for e in before}:
            raise SourceError(f"source directory {self.root} changed while it was copied: try again")
        return fetched
