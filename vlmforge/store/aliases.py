"""Aliases: mutable names of builds (``latest``, ``stable``), moved by compare-and-swap with a history."""

from __future__ import annotations

import logging
import random
import time
import uuid

from vlmforge.artifacts.manifest import EngineManifest
from vlmforge.errors import IntegrityError, NotFound, StoreConflict
from vlmforge.store.backend import PreconditionFailed
from vlmforge.store.identity import StoreIdentity
from vlmforge.store.keys import ALIAS_HISTORY, actor, alias_key, checked_name, utcnow
from vlmforge.store.locks import StoreLocks
from vlmforge.store.reading import StoreReader
from vlmforge.store.records import AliasEvent, AliasRecord
from vlmforge.store.refs import ANY, Ref, _AnyBuild
from vlmforge.store.results import AliasMove

logger = logging.getLogger(__name__)


class AliasOps(StoreReader, StoreLocks, StoreIdentity):
    """Moving aliases: the low-level CAS, explicit promotion, and the forward-only move publish uses."""

    def set_alias(
        self, model: str, alias: str, build_id: str, *, expected: str | None | _AnyBuild = ANY
    ) -> AliasRecord:
        """Point ``model@alias`` at ``build_id`` by compare-and-swap.

        ``expected`` is the build id the caller believes the alias points to now (None: the alias
        must not exist); if it points elsewhere, StoreConflict names the expected and actual builds.
        With ``expected=ANY`` the move is retried until it wins (an unreadable record is replaced).
        """
        checked_name(model, "model name")
        checked_name(alias, "alias")
        self._require_store(f"move alias {model}@{alias}")
        manifest = self._read_manifest(model, checked_name(build_id, "build id"))
        with self._writer_lock(f"alias {model}@{alias}"):
            if expected is ANY:
                self._move_alias(manifest, alias, only_if_newer=False)
                record = self.get_alias(model, alias)
                assert record is not None
                return record
            return self._swap_alias(model, alias, build_id, expected)

    def promote(self, ref: str | Ref, alias: str, *, expected: str | None | _AnyBuild = ANY) -> AliasMove:
        """Point ``alias`` of the ref's model at the build the ref resolves to (explicit, may move backwards)."""
        checked_name(alias, "alias")
        self._require_store(f"promote {ref}")
        manifest = self.resolve(ref)
        with self._writer_lock(f"promote {manifest.ref} to {alias}"):
            if expected is ANY:
                return self._move_alias(manifest, alias, only_if_newer=False)
            before = self._current_alias(manifest.model, alias, replace_unreadable=False)[0]
            self._swap_alias(manifest.model, alias, manifest.build_id, expected)
            previous = before.build_id if before else None
            return AliasMove(
                model=manifest.model, alias=alias, previous=previous, build_id=manifest.build_id,
                moved=previous != manifest.build_id,
            )

    def move_alias(self, ref: str | Ref, alias: str, *, only_if_newer: bool = True, attempts: int = 8) -> AliasMove:
        """Move an alias, retrying after lost races; with ``only_if_newer`` never move it to an older build.

        This is the conflict-retry helper publish uses: after a StoreConflict it re-reads the alias
        and re-applies the move unless the alias now points to a build at least as new.
        """
        checked_name(alias, "alias")
        self._require_store(f"move alias {alias} to {ref}")
        manifest = self.resolve(ref)
        with self._writer_lock(f"alias {manifest.model}@{alias}"):
            return self._move_alias(manifest, alias, only_if_newer=only_if_newer, attempts=attempts)

    def alias_in_place(self, manifest: EngineManifest, alias: str) -> AliasMove | None:
        """What publishing ``manifest`` would leave ``alias`` as, when it would not move it (it points there already,
        or to a newer build); None when publishing would move it. Reads only: the published-build check asks this.
        An unreadable alias record raises IntegrityError, as publishing would."""
        current, _ = self._current_alias(manifest.model, checked_name(alias, "alias"), replace_unreadable=False)
        return self._alias_stays(manifest, alias, current.build_id if current else None, only_if_newer=True)

    def _alias_stays(self, manifest: EngineManifest, alias: str, found: str | None, *,
                     only_if_newer: bool) -> AliasMove | None:
        """The outcome when the alias, now at ``found``, is not to move to ``manifest``'s build; else None."""
        model, build_id = manifest.model, manifest.build_id
        if found == build_id:
            return AliasMove(model=model, alias=alias, previous=found, build_id=build_id, moved=False,
                             note="already there")
        if only_if_newer and found is not None:
            try:
                other = self._read_manifest(model, found)
            except (NotFound, IntegrityError):
                other = None  # dangling or unreadable target: replace it
            if other is not None and other.sort_key() > manifest.sort_key():
                return AliasMove(model=model, alias=alias, previous=found, build_id=found, moved=False,
                                 note=f"kept: {found} is newer")
        return None

    def _current_alias(self, model: str, alias: str, *, replace_unreadable: bool) -> tuple[AliasRecord | None, str | None]:
        """The alias record and its version; an unreadable record is refused, or (explicit moves) to be replaced."""
        try:
            return self._read_alias(model, alias)
        except IntegrityError as exc:
            if not replace_unreadable:
                raise IntegrityError(
                    f"{exc}; repair it with `vlmforge store promote {model}#BUILD_ID {alias}`"
                ) from None
            logger.warning("replacing an unreadable alias record: %s", exc)
            try:
                return None, self._get(alias_key(model, alias))[1]
            except NotFound:
                return None, None

    def _move_alias(
        self, manifest: EngineManifest, alias: str, *, only_if_newer: bool, attempts: int = 8
    ) -> AliasMove:
        model, build_id = manifest.model, manifest.build_id
        for attempt in range(1, attempts + 1):
            current, _ = self._current_alias(model, alias, replace_unreadable=not only_if_newer)
            found = current.build_id if current else None
            stays = self._alias_stays(manifest, alias, found, only_if_newer=only_if_newer)
            if stays is not None:
                return stays
            try:
                self._swap_alias(model, alias, build_id, found, replace_unreadable=not only_if_newer)
            except StoreConflict as exc:
                delay = min(2.0, 0.05 * 2**attempt) * (0.5 + random.random())
                logger.info("%s; retrying in %.2fs (attempt %d/%d)", exc, delay, attempt, attempts)
                time.sleep(delay)
                continue
            return AliasMove(model=model, alias=alias, previous=found, build_id=build_id, moved=True)
        raise StoreConflict(
            f"gave up moving alias {model}@{alias} to {build_id} after {attempts} lost races; retry later"
        )

    def _swap_alias(
        self, model: str, alias: str, build_id: str, expected: str | None, *, replace_unreadable: bool = False
    ) -> AliasRecord:
        current, version = self._current_alias(model, alias, replace_unreadable=replace_unreadable)
        found = current.build_id if current else None
        if found != expected:
            raise _alias_conflict(model, alias, expected, found)
        now = utcnow()
        event = AliasEvent(build_id=build_id, previous=found, at=now, by=actor())
        history = [event, *(current.history if current else [])][:ALIAS_HISTORY]
        record = AliasRecord(
            model=model, alias=alias, build_id=build_id, updated_at=now, by=event.by,
            token=uuid.uuid4().hex, history=history,
        )
        data = record.model_dump_json(indent=2).encode() + b"\n"
        try:
            self._put(alias_key(model, alias), data, if_absent=version is None, if_version=version)
        except PreconditionFailed:
            after, _ = self._current_alias(model, alias, replace_unreadable=True)
            if after is not None and after.token == record.token:
                return after  # our own write landed; only its response was lost
            raise _alias_conflict(model, alias, expected, after.build_id if after else None) from None
        logger.info("alias %s@%s: %s -> %s", model, alias, found, build_id)
        return record


def _alias_conflict(model: str, alias: str, expected: str | None, actual: str | None) -> StoreConflict:
    return StoreConflict(
        f"alias {model}@{alias} conflict: expected it to point to {expected or '(no alias yet)'}, but it points"
        f" to {actual or '(nothing: alias absent)'} (another writer moved it); re-read it and retry"
    )
