"""The artifact store API: one class composed of the store's parts, which the backends subclass.

Parts, each in its own module: ``keys`` (layout), ``refs``, ``records`` (marker, aliases, locks), ``results``,
``backend`` (the primitives a backend supplies), ``reading``, ``identity`` (the store marker), ``locks`` (leases),
``aliases``, ``publish``, ``pull`` (with ``engine_dir``), ``tune`` (compile caches beside a build) and ``gc``. The
names below stay importable from here.
"""

from __future__ import annotations

from vlmforge.store.backend import DEFAULT_GC_GRACE, DEFAULT_LOCK_LEASE, PreconditionFailed, StoreBackend
from vlmforge.store.gc import GcOps
from vlmforge.store.keys import (
    ALIAS_HISTORY,
    DEFAULT_ALIAS,
    GC_LOCK,
    MARKER,
    SCRATCH,
    STORE_MARKER,
    WRITER_LOCKS,
    alias_key,
    blob_key,
    build_key,
)
from vlmforge.store.publish import PublishOps
from vlmforge.store.pull import PullOps
from vlmforge.store.records import AliasEvent, AliasRecord, IncompleteUpload, LockInfo, ObjectInfo, StoreInfo
from vlmforge.store.refs import ANY, Ref
from vlmforge.store.results import (
    AliasMove,
    BuildSummary,
    GcBlob,
    GcBuild,
    GcReport,
    ModelSummary,
    PublishResult,
    PullCheck,
    PullResult,
)

__all__ = [
    "ALIAS_HISTORY",
    "ANY",
    "DEFAULT_ALIAS",
    "DEFAULT_GC_GRACE",
    "DEFAULT_LOCK_LEASE",
    "GC_LOCK",
    "MARKER",
    "SCRATCH",
    "STORE_MARKER",
    "WRITER_LOCKS",
    "AliasEvent",
    "AliasMove",
    "AliasRecord",
    "ArtifactStore",
    "BuildSummary",
    "GcBlob",
    "GcBuild",
    "GcReport",
    "IncompleteUpload",
    "LockInfo",
    "ModelSummary",
    "ObjectInfo",
    "PreconditionFailed",
    "PublishResult",
    "PullCheck",
    "PullResult",
    "Ref",
    "StoreBackend",
    "StoreInfo",
    "alias_key",
    "blob_key",
    "build_key",
]


class ArtifactStore(PublishOps, PullOps, GcOps):
    """Content-addressed engine store; subclasses supply object primitives and blob transfers.

    Layout (relative to the store root): ``vlmforge-store.json`` (the store marker),
    ``blobs/sha256/<aa>/<hex>`` (file contents), ``models/<model>/builds/<build_id>.json``
    (immutable manifests, written last), ``models/<model>/aliases/<alias>.json`` (moved by
    compare-and-swap), ``models/<model>/tune/<build_id>/<key>.json`` (tune artifacts' records), ``locks/``
    (writers and gc, with leases).
    """
