"""Model sources: one interface (resolve a revision, fetch and verify) over tiny://, file://, s3:// and hf://."""

from __future__ import annotations

from vlmforge.sources.base import FetchedSource, FileEntry, Source, hash_tree, verify_tree
from vlmforge.specs.schema import SourceURI, parse_source


def open_source(uri: str | SourceURI) -> Source:
    """The source object for a URI (validated by :func:`vlmforge.specs.schema.parse_source`)."""
    parsed = parse_source(uri) if isinstance(uri, str) else uri
    if parsed.scheme == "tiny":
        from vlmforge.sources.tiny import TinySource

        return TinySource(parsed)
    if parsed.scheme == "file":
        from vlmforge.sources.local import LocalSource

        return LocalSource(parsed)
    if parsed.scheme == "s3":
        from vlmforge.sources.s3 import S3Source

        return S3Source(parsed)
    from vlmforge.sources.hf import HfSource

    return HfSource(parsed)


__all__ = ["FetchedSource", "FileEntry", "Source", "hash_tree", "open_source", "verify_tree"]
