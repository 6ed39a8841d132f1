"""tiny:// sources: a family's deterministic random-weight model, built locally with no download."""

from __future__ import annotations

import tempfile
from pathlib import Path

from vlmforge.errors import SourceError
from vlmforge.families import family_names, get_family
from vlmforge.families.base import ModelFamily
from vlmforge.sources.base import FetchedSource, Source, hash_tree, tree_digest


class TinySource(Source):
    """tiny://FAMILY: the revision is the digest of the generated files (same code, same bytes)."""

    def family(self) -> ModelFamily:
        wanted = f"tiny://{self.uri.location}"
        for name in family_names():
            family = get_family(name)
            if family.tiny_source == wanted:
                return family
        known = sorted(get_family(n).tiny_source for n in family_names() if get_family(n).tiny_source)
        raise SourceError(f"no family makes {wanted}; tiny sources: {', '.join(known)}")

    def resolve_revision(self) -> str:
        with tempfile.TemporaryDirectory(prefix="vlmforge-tiny-") as tmp:
            self.family().make_tiny(Path(tmp))
            return "tiny-sha256:" + tree_digest(hash_tree(Path(tmp)))

    def fetch(self, dest: Path) -> FetchedSource:
        dest.mkdir(parents=True, exist_ok=True)
        self.family().make_tiny(dest)
        return self._finish(dest, "tiny-sha256:" + tree_digest(hash_tree(dest)))
