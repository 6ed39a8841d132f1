"""The store's layout: object keys, reserved names and the small helpers every part of the store shares."""

from __future__ import annotations

import getpass
import os
import socket
from datetime import UTC, datetime
from typing import Final

from vlmforge.artifacts.manifest import check_name
from vlmforge.errors import StoreError

DEFAULT_ALIAS: Final = "latest"
MARKER: Final = ".vlmforge-manifest.json"
"""File written into a pulled engine directory: the manifest it was pulled from."""
SUBSET: Final = ".vlmforge-excluded.json"
"""File written beside the marker when a pull left top-level folders out: their names (a JSON list). Absent: the
directory holds every file of the manifest."""
STORE_MARKER: Final = "vlmforge-store.json"
"""Object at the store root that makes a location a store (written when the store is created)."""
SCRATCH: Final = ".vlmforge-scratch"
"""The local backend's private scratch directory (files being written); gc removes only its own files there."""
ALIAS_HISTORY: Final = 100
LOCKS: Final = "locks/"
WRITER_LOCKS: Final = "locks/writers/"
GC_LOCK: Final = "locks/gc.json"
LAYOUT: Final = frozenset({"blobs", "models", "locks", STORE_MARKER, SCRATCH, ".flock", "tmp"})
"""Top-level names a store holds (``tmp`` and ``.flock`` as written by versions before the store marker)."""


def blob_key(sha256: str) -> str:
    """Key of the content-addressed blob holding bytes with this sha256."""
    return f"blobs/sha256/{sha256[:2]}/{sha256}"


def build_key(model: str, build_id: str) -> str:
    """Key of the immutable manifest of one build."""
    return f"models/{model}/builds/{build_id}.json"


def alias_key(model: str, alias: str) -> str:
    """Key of the mutable alias record of a model."""
    return f"models/{model}/aliases/{alias}.json"


def utcnow() -> datetime:
    """The current time, timezone-aware (UTC)."""
    return datetime.now(UTC)


def actor() -> str:
    """``user@host`` of this process, recorded in alias history and locks."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def checked_name(value: str, what: str) -> str:
    """``value`` if it is a valid model name, alias or build id, else StoreError naming ``what`` and the rule."""
    try:
        return check_name(value, what)
    except ValueError as exc:
        raise StoreError(str(exc)) from None
