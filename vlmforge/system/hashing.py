"""One way to read a file's sha256: in chunks into one reused buffer (hashlib releases the GIL, so threads hash in
parallel), optionally feeding the same bytes to another hash or a progress counter."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

MiB = 1024 * 1024


def sha256_and_size(path: Path, chunk: int = 8 * MiB, *, also: Any = None,
                    on_read: Callable[[int], None] | None = None) -> tuple[str, int]:
    """(sha256 hex, bytes read) of ``path`` in one pass. ``also``: another hashlib object fed the same bytes;
    ``on_read``: called with each chunk's size (progress)."""
    digest = hashlib.sha256()
    size = 0
    buf = bytearray(chunk)
    view = memoryview(buf)
    with path.open("rb", buffering=0) as handle:
        while n := handle.readinto(buf):
            digest.update(view[:n])
            if also is not None:
                also.update(view[:n])
            if on_read is not None:
                on_read(n)
            size += n
    return digest.hexdigest(), size
