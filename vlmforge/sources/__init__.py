"""Model sources: one interface (resolve a revision, fetch and verify) over tiny://, file://, s3:// and hf://."""

from __future__ import annotations

from vlmforge.sources.base import DigestCache, FetchedSource, FileEntry, Source, hash_tree, verify_tree
from vlmforge.specs.schema import SourceURI, parse_source


def open_source(uri: str | SourceURI, *, digests: DigestCache | None = None) -> Source:
    """The source object for a URI (validated by :func:`vlmforge.specs.schema.parse_source`); ``digests``: the
    build's file digests, shared with its other steps."""
    parsed = parse_source(uri) if isinstance(uri, str) else uri
    if parsed.scheme == "tiny":
        from vlmforge.sources.tiny import TinySource

        return TinySource(parsed, digests)
    if parsed.scheme == "file":
        from vlmforge.sources.local import LocalSource

        return LocalSource(parsed, digests)
    if parsed.scheme == "s3":
        from vlmforge.sources.s3 import S3Source

        return S3Source(parsed, digests)
    from vlmforge.sources.hf import HfSource

    return HfSource(parsed, digests)


__all__ = ["DigestCache", "FetchedSource", "FileEntry", "Source", "hash_tree", "open_source", "verify_tree"]
