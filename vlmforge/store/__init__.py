"""Engine artifact store: content-addressed, verified, atomic publish/pull with aliases and retention."""

from __future__ import annotations

import os
from pathlib import Path

from vlmforge.errors import StoreError
from vlmforge.store.base import (
    ANY,
    AliasMove,
    AliasRecord,
    ArtifactStore,
    BuildSummary,
    GcReport,
    ModelSummary,
    PublishResult,
    PullCheck,
    PullResult,
    Ref,
    StoreInfo,
)
from vlmforge.store.local import LocalStore
from vlmforge.store.transfer import TransferSettings

STORE_ENV = "VLMFORGE_STORE"

__all__ = [
    "ANY",
    "STORE_ENV",
    "AliasMove",
    "AliasRecord",
    "ArtifactStore",
    "BuildSummary",
    "GcReport",
    "LocalStore",
    "ModelSummary",
    "PublishResult",
    "PullCheck",
    "PullResult",
    "Ref",
    "StoreInfo",
    "TransferSettings",
    "default_store_url",
    "open_store",
]


def default_store_url() -> str:
    """``$VLMFORGE_STORE`` if set, else ``$XDG_DATA_HOME/vlmforge/store`` (``~/.local/share/vlmforge/store``)."""
    configured = os.environ.get(STORE_ENV)
    if configured:
        return configured
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return str(Path(data_home) / "vlmforge" / "store")


def open_store(url: str | None = None, *, settings: TransferSettings | None = None) -> ArtifactStore:
    """Open the store at ``url``: ``s3://bucket[/prefix]``, ``file:///path`` or a path (default: see above)."""
    url = url or default_store_url()
    if url.startswith("s3://"):
        from vlmforge.store.s3 import S3Store  # boto3 is only imported when S3 is used

        bucket, _, prefix = url[len("s3://") :].partition("/")
        if not bucket:
            raise StoreError(f"bad store URL {url!r}: expected s3://BUCKET[/PREFIX]")
        return S3Store(bucket, prefix, settings=settings)
    if url.startswith("file://"):
        url = url[len("file://") :]
    elif "://" in url:
        raise StoreError(f"unsupported store URL {url!r}: use s3://BUCKET[/PREFIX] or a local directory")
    return LocalStore(Path(url), settings=settings)
