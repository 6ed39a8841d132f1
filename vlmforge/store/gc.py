"""Retention: keep the newest builds of each model and every alias target, delete the rest and unshared blobs.

gc never deletes what it cannot account for: a manifest or alias record it cannot read (newer schema, corrupt,
crafted) may reference any blob or pin any build, so ``--apply`` refuses while one exists unless told
``ignore_unreadable`` (then every sha256 and build id found in their raw bytes is still kept). Blobs and upload
leftovers younger than the grace period are never collected: a publisher may be about to reference them.
"""

from __future__ import annotations

import logging
import re
from datetime import timedelta

from vlmforge.artifacts.manifest import EngineManifest, check_name
from vlmforge.errors import NotFound, StoreError
from vlmforge.store.keys import build_key, utcnow
from vlmforge.store.locks import Lease
from vlmforge.store.reading import Refused
from vlmforge.store.records import ObjectInfo
from vlmforge.store.results import GcBlob, GcBuild, GcReport
from vlmforge.store.tune import TuneOps

logger = logging.getLogger(__name__)

_SHA256 = re.compile(rb"[0-9a-f]{64}")
_BLOB_KEY = re.compile(r"^blobs/sha256/([0-9a-f]{2})/([0-9a-f]{64})$")


class GcOps(TuneOps):
    """``gc``: the retention policy, its dry run and its locked application."""

    def gc(
        self,
        keep: int = 5,
        *,
        apply: bool = False,
        break_locks: bool = False,
        grace: timedelta | None = None,
        ignore_unreadable: bool = False,
    ) -> GcReport:
        """Keep the newest ``keep`` builds of each model plus every alias target; delete the rest.

        A dry run (default) only reports, listing every build, blob and upload leftover ``apply`` would
        remove. With ``apply`` the gc lock is taken first (refused while a live publish/promote runs;
        locks of provably dead holders are broken and reported), manifests are deleted before the blobs
        only they use, and upload leftovers are removed. Blobs and leftovers younger than ``grace``
        (default: the store's ``gc_grace``, 1 hour) are kept. ``apply`` refuses while any manifest or
        alias record is unreadable, unless ``ignore_unreadable``. ``break_locks`` is accepted for
        compatibility: dead holders' locks are always broken, live holders' never.
        """
        if keep < 1:
            raise StoreError("gc --keep must be at least 1")
        grace = self.gc_grace if grace is None else grace
        if grace < timedelta(0):
            raise StoreError("gc --grace must not be negative")
        self._require_store("collect garbage")
        if break_locks:
            logger.info("break_locks: gc breaks the locks of provably dead holders anyway, and never a live one's")
        if not apply:
            return self._gc(keep, grace, ignore_unreadable, lease=None)
        with self._gc_lock() as (lease, broken):
            report = self._gc(keep, grace, ignore_unreadable, lease=lease)
            return report.model_copy(update={"broken_locks": broken})

    def _gc(self, keep: int, grace: timedelta, ignore_unreadable: bool, *, lease: Lease | None) -> GcReport:
        kept: list[GcBuild] = []
        deleted: list[GcBuild] = []
        dangling: list[str] = []
        refused_manifests: list[Refused] = []
        refused_aliases: list[Refused] = []
        referenced: set[str] = set()  # sha256 of kept readable builds
        salvaged: set[str] = set()  # sha256 named anywhere in unreadable records
        stale_tune: list[str] = []  # tune records of builds that are deleted or gone
        for model in sorted(self._children("models/")):
            try:
                check_name(model, "model name")
            except ValueError as exc:
                refused_manifests.append((f"models/{model}/", f"unexpected entry: {exc}"))
                for info in self._list(f"models/{model}/"):
                    salvaged |= self._named_blobs(info.key)
                continue
            manifests, bad = self._read_manifests(model, self._build_ids(model))
            records, bad_aliases = self._aliases(model)
            refused_manifests.extend(bad)
            refused_aliases.extend(bad_aliases)
            for key, _ in bad:
                salvaged |= self._named_blobs(key)
            pinned = self._named_builds([key for key, _ in bad_aliases], {m.build_id for m in manifests})
            targets = {alias: record.build_id for alias, record in records.items()}
            known = {m.build_id for m in manifests} | {key.rsplit("/", 1)[1][: -len(".json")] for key, _ in bad}
            dangling.extend(f"{model}@{a} -> {b}" for a, b in sorted(targets.items()) if b not in known)
            tuned = self._tune_builds(model)
            for rank, m in enumerate(sorted(manifests, key=EngineManifest.sort_key, reverse=True)):
                reasons = [f"alias {a}" for a, b in sorted(targets.items()) if b == m.build_id]
                if m.build_id in pinned:
                    reasons.append("named by an unreadable alias record")
                if rank < keep:
                    reasons.insert(0, f"newest {rank + 1}/{keep}")
                item = GcBuild(model=model, build_id=m.build_id, created_at=m.created_at, reasons=reasons)
                if reasons:
                    kept.append(item)
                    referenced.update(entry.sha256 for entry in m.files)
                    records, bad_tune = self._tune_records(model, m.build_id)
                    referenced.update(record.sha256 for record in records)
                    for key, _ in bad_tune:  # an unreadable tune record may name any blob: keep what it names
                        salvaged |= self._named_blobs(key)
                else:
                    item.reasons = [f"older than the newest {keep}, no alias"]
                    deleted.append(item)
                    stale_tune.extend(tuned.get(m.build_id, []))
            stale_tune.extend(key for build_id, keys in sorted(tuned.items()) if build_id not in known for key in keys)

        cutoff = utcnow() - grace
        stored = self._stored_blobs()
        unreferenced = [info for sha, info in stored.items() if sha not in referenced and sha not in salvaged]
        doomed = sorted((i for i in unreferenced if i.modified <= cutoff), key=lambda i: i.key)
        young = len(unreferenced) - len(doomed)
        missing = sorted(referenced - set(stored))
        for sha in missing:
            logger.error("blob %s is referenced by a kept build but missing from %s", sha, self.url)
        incomplete = self._list_incomplete(started_before=cutoff)
        refusal = _refusal(self.url, refused_manifests + refused_aliases) if not ignore_unreadable else None

        cleaned = 0
        if lease is not None:
            if refusal is not None:
                raise StoreError(refusal)
            lease.check()
            self._delete_many([build_key(b.model, b.build_id) for b in deleted])
            self._delete_many(stale_tune)
            lease.check()
            self._delete_many([info.key for info in doomed])
            cleaned = self._remove_incomplete(incomplete)
            logger.info("gc deleted %d builds, %d blobs and %d upload leftovers", len(deleted), len(doomed), cleaned)
        doomed_shas = {_BLOB_KEY.match(i.key).group(2) for i in doomed}  # type: ignore[union-attr]
        return GcReport(
            applied=lease is not None,
            keep=keep,
            grace_seconds=grace.total_seconds(),
            kept=kept,
            deleted=deleted,
            blobs_kept=len(stored) - len(doomed),
            bytes_kept=sum(i.size for sha, i in stored.items() if sha not in doomed_shas),
            blobs_deleted=len(doomed),
            bytes_deleted=sum(i.size for i in doomed),
            blobs=[GcBlob(sha256=_BLOB_KEY.match(i.key).group(2), size=i.size, modified=i.modified)  # type: ignore[union-attr]
                   for i in doomed],
            blobs_young=young,
            dangling_aliases=dangling,
            missing_blobs=missing,
            refused_manifests=[key for key, _ in refused_manifests],
            refused_aliases=[key for key, _ in refused_aliases],
            reasons=dict(refused_manifests + refused_aliases),
            refusal=refusal,
            ignored_unreadable=ignore_unreadable and bool(refused_manifests or refused_aliases),
            incomplete=incomplete,
            incomplete_cleaned=cleaned,
            tune_records=sorted(stale_tune),
        )

    def _stored_blobs(self) -> dict[str, ObjectInfo]:
        """sha256 -> object of every blob; objects under ``blobs/`` that are not blobs are left alone."""
        out = {}
        for info in self._list("blobs/sha256/"):
            match = _BLOB_KEY.match(info.key)
            if match and match.group(2).startswith(match.group(1)):
                out[match.group(2)] = info
            else:
                logger.warning("ignoring %s in %s: not a blob of this store", info.key, self.url)
        return out

    def _raw(self, key: str) -> bytes:
        try:
            return self._get(key)[0]
        except NotFound:
            return b""

    def _named_blobs(self, key: str) -> set[str]:
        """Every sha256 that appears in the raw bytes of an unreadable record (it may reference those blobs)."""
        return {m.decode() for m in _SHA256.findall(self._raw(key))}

    def _named_builds(self, keys: list[str], build_ids: set[str]) -> set[str]:
        """The build ids that appear in the raw bytes of unreadable alias records (they may point there)."""
        raw = b"\n".join(self._raw(key) for key in keys)
        return {b for b in build_ids if b.encode() in raw} if raw else set()


def _refusal(url: str, refused: list[Refused]) -> str | None:
    if not refused:
        return None
    key, reason = refused[0]
    more = f" and {len(refused) - 1} more" if len(refused) > 1 else ""
    return (
        f"gc refused on {url}: {len(refused)} manifest(s) or alias record(s) cannot be read ({key}: {reason}{more});"
        " gc cannot know which blobs and builds they need, so collecting now could delete them. Fix them (upgrade"
        " vlmforge if they are newer, repair or remove them otherwise; a dry run lists them), or pass"
        " --ignore-unreadable to collect anyway: blobs and builds named in their raw bytes are still kept, but"
        " anything else they need is lost"
    )
