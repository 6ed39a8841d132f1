"""What makes a location a store: the marker object, written when a store is created, checked before any change.

A gc, pull or publish pointed at the wrong place (a home directory, a bucket prefix holding other data) must not
touch it. The marker ``vlmforge-store.json`` at the root says "this is a vlmforge store". Publishing into an empty
location creates the store (and its marker); anything that finds a non-empty location without the marker refuses,
naming the fix. Stores made before markers existed are adopted with ``vlmforge store init --adopt``.
"""

from __future__ import annotations

import logging

from vlmforge.errors import NotFound, StoreError
from vlmforge.store.backend import PreconditionFailed, StoreBackend
from vlmforge.store.keys import LAYOUT, SCRATCH, STORE_MARKER, actor, utcnow
from vlmforge.store.records import StoreInfo, parse_store_info

logger = logging.getLogger(__name__)

_IGNORED_WHEN_EMPTY = frozenset({SCRATCH})
"""Our own scratch space may appear a moment before the marker (the marker is written through it)."""


class StoreIdentity(StoreBackend):
    """The store marker: read it, require it, create it."""

    _store_info: StoreInfo | None = None

    def store_info(self) -> StoreInfo | None:
        """The store marker, or None if this location has none (not a store, or not yet created)."""
        if self._store_info is not None:
            return self._store_info
        try:
            data, _ = self._get(STORE_MARKER)
        except NotFound:
            return None
        self._store_info = parse_store_info(data, f"{self.url}/{STORE_MARKER}")
        return self._store_info

    def init(self, *, adopt: bool = False) -> StoreInfo:
        """Create the store here (an empty location), or adopt a store made before markers (``adopt``).

        Idempotent: a location that already is a store is left as it is. A non-empty location is refused unless
        ``adopt`` is given and everything in it belongs to a store's layout.
        """
        info = self.store_info()
        if info is not None:
            return info
        found = self._foreign_entries()
        if self._store_info is not None:
            return self._store_info
        if found:
            unknown = sorted(name for name in found if name.rstrip("/") not in LAYOUT)
            if not adopt:
                raise StoreError(self._not_a_store(found, doing="create a store"))
            if not _looks_like_a_store(found):
                what = f"{_names(unknown)}, which no vlmforge store contains" if unknown else (
                    f"{_names(found)} but no blobs/ or models/")
                raise StoreError(
                    f"{self.url} holds {what}: it is not a store made by an older vlmforge, so it cannot be"
                    " adopted; choose an empty location for the store"
                )
        return self._write_marker(adopted=bool(found))

    def _require_store(self, doing: str) -> StoreInfo:
        """The marker; StoreError naming what was refused (``doing``) and the fix if this location is not a store."""
        info = self.store_info()
        if info is None:
            found = self._foreign_entries()
            if self._store_info is None:
                raise StoreError(self._not_a_store(found, doing=doing))
            info = self._store_info
        return info

    def _ensure_store(self, doing: str) -> StoreInfo:
        """The marker, created first if the location is empty (a first publish creates the store)."""
        info = self.store_info()
        if info is not None:
            return info
        found = self._foreign_entries()
        if self._store_info is not None:  # created meanwhile by a concurrent first publish
            return self._store_info
        if found:
            raise StoreError(self._not_a_store(found, doing=doing))
        return self._write_marker(adopted=False)

    def _write_marker(self, *, adopted: bool) -> StoreInfo:
        info = StoreInfo(created_at=utcnow(), created_by=actor(), adopted=adopted)
        try:
            self._put(STORE_MARKER, info.model_dump_json(indent=2).encode() + b"\n", if_absent=True)
        except PreconditionFailed:  # a concurrent first publish created it: use theirs
            existing = self.store_info()
            if existing is None:
                raise StoreError(f"the store marker of {self.url} vanished while it was being created") from None
            return existing
        logger.info("%s store %s", "adopted" if adopted else "created", self.url)
        self._store_info = info
        return info

    def _foreign_entries(self) -> list[str]:
        """What the root holds besides our scratch space; [] once a marker appeared meanwhile (a concurrent
        first publish created the store), which is then cached in ``_store_info``."""
        found = [name for name in self._entries("") if name.rstrip("/") not in _IGNORED_WHEN_EMPTY]
        if STORE_MARKER in found and self.store_info() is not None:
            return []
        return found

    def _not_a_store(self, found: list[str], *, doing: str) -> str:
        marker = f"no {STORE_MARKER}"
        if not found:
            return f"refusing to {doing}: {self.url} is not a vlmforge store ({marker}; nothing was published there)"
        if _looks_like_a_store(found):
            return (
                f"refusing to {doing}: {self.url} looks like a store made before vlmforge wrote store markers"
                f" ({marker}); if it is one, adopt it once with `vlmforge store init --adopt --store {self.url}`"
            )
        return (
            f"refusing to {doing}: {self.url} is not a vlmforge store ({marker}) and holds other data"
            f" ({_names(found)}); point --store at a store, or at an empty location to create one"
        )


def _looks_like_a_store(found: list[str]) -> bool:
    """Everything found belongs to a store's layout, and there are blobs or models (a store made before markers)."""
    names = {name.rstrip("/") for name in found}
    return names <= LAYOUT and bool(names & {"blobs", "models"})


def _names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(sorted(names)[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
