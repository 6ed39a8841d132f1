"""tiny:// sources: a family's deterministic random-weight models, built locally with no download."""

from __future__ import annotations

import tempfile
from pathlib import Path

from vlmforge.errors import SourceError
from vlmforge.families import family_names, get_family
from vlmforge.families.base import ModelFamily
from vlmforge.sources.base import FetchedSource, Source, hash_tree, tree_digest


class TinySource(Source):
    """tiny://FAMILY: the revision is the digest of the generated files (same code, same bytes)."""

    @property
    def wanted(self) -> str:
        return f"tiny://{self.uri.location}"

    def family(self) -> ModelFamily:
        for name in family_names():
            family = get_family(name)
            if self.wanted in family.tiny_sources():
                return family
        known = sorted(s for n in family_names() for s in get_family(n).tiny_sources())
        raise SourceError(f"no family makes {self.wanted}; tiny sources: {', '.join(known)}")

    def revision_key(self) -> str:
        """The generated files depend only on vlmforge's code, the installed libraries and this machine."""
        import hashlib

        from vlmforge.system.env import installation_digest

        return hashlib.sha256(f"tiny-source\0{self.wanted}\0{installation_digest()}".encode()).hexdigest()

    def resolve_revision(self) -> str:
        with tempfile.TemporaryDirectory(prefix="vlmforge-tiny-") as tmp:
            self.family().make_tiny_source(self.wanted, Path(tmp))
            return "tiny-sha256:" + tree_digest(hash_tree(Path(tmp), digests=self.digests))

    def fetch(self, dest: Path, revision: str | None = None) -> FetchedSource:
        dest.mkdir(parents=True, exist_ok=True)
        self.family().make_tiny_source(self.wanted, dest)
        fetched = self._finish(dest, "tiny-sha256:" + tree_digest(hash_tree(dest)))
        self._check_pinned(revision, fetched.revision)  # other code or libraries since it was resolved
        return fetched
