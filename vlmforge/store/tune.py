"""Tune artifacts: torch's compile caches for one build on one kind of machine, stored beside the build.

A build's runner compiles its static decode buckets on every start (``vlmforge.runner.static``); the result
depends only on the engine, the GPU and the torch/Triton versions. ``vlmforge tune`` runs the warm-up once on
the target machine and stores what ``torch.compiler.save_cache_artifacts()`` returns as a content-addressed blob
(verified on read like every blob) with a small record naming the :class:`TuneKey` it is valid for, at
``models/<model>/tune/<build_id>/<key digest>.json``. The build's manifest and fingerprint are untouched; gc keeps
the tune artifacts of the builds it keeps and drops those of the builds it deletes.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from pathlib import Path
from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from vlmforge.artifacts.manifest import SHA256_PATTERN, BuildId, EngineManifest, FileEntry, ModelName
from vlmforge.errors import IntegrityError, NotFound
from vlmforge.store.identity import StoreIdentity
from vlmforge.store.keys import actor, blob_key, utcnow
from vlmforge.store.locks import StoreLocks
from vlmforge.store.reading import Refused, StoreReader
from vlmforge.store.records import parse_record
from vlmforge.store.refs import Ref
from vlmforge.store.transfer import NullSink, TaskGroup

logger = logging.getLogger(__name__)

TUNE_SCHEMA = 1
TUNE_BLOB_PATH = "tune-artifacts.bin"
"""The name a tune artifact's blob goes by in messages (it is no file of the engine directory)."""


def tune_prefix(model: str, build_id: str) -> str:
    """Where the tune records of one build live."""
    return f"models/{model}/tune/{build_id}/"


class TuneKey(BaseModel):
    """What a tune artifact is valid for: compile caches are reused only where every part matches."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    fingerprint: str = Field(pattern=SHA256_PATTERN)
    """The engine build's fingerprint (its manifest's)."""
    device: str
    """The GPU's name (``NVIDIA H200``), or ``cpu``."""
    capability: str
    """The GPU's compute capability (``9.0``), or the CPU's architecture (``x86_64``)."""
    torch: str
    """torch.__version__ of the process that compiled."""
    triton: str | None
    """triton.__version__, or None where Triton is not installed."""
    compile_mode: str
    """torch.compile mode of the static decode step."""
    buckets: tuple[tuple[int, int], ...]
    """The (batch, cache length) buckets that were compiled, sorted."""

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()

    def differences(self, other: TuneKey) -> list[str]:
        """Each key part that differs, as ``part: this vs other`` (the buckets differ only where ``self`` needs one
        that ``other`` lacks: more compiled buckets than needed do no harm)."""
        out = []
        for name in ("fingerprint", "device", "capability", "torch", "triton", "compile_mode"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                out.append(f"{name}: {mine} here, {theirs} in the artifact")
        missing = sorted(set(self.buckets) - set(other.buckets))
        if missing:
            out.append(f"buckets: {missing} needed here, not in the artifact's {list(other.buckets)}")
        return out


class TuneRecord(BaseModel):
    """A stored tune artifact: its key, its blob and where it came from."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = TUNE_SCHEMA
    model: ModelName
    build_id: BuildId
    key: TuneKey
    sha256: str = Field(pattern=SHA256_PATTERN)
    size: int = Field(ge=1)
    created_at: AwareDatetime
    by: str
    warmup_seconds: float = Field(ge=0)
    """How long the cold warm-up that produced it took."""
    artifacts: dict[str, int] = Field(default_factory=dict)
    """Cache entries by kind (inductor, autotune, aot_autograd, ...), as torch reported them."""

    @property
    def ref(self) -> str:
        return f"{self.model}#{self.build_id}"

    @property
    def entry(self) -> FileEntry:
        return FileEntry(path=TUNE_BLOB_PATH, sha256=self.sha256, size=self.size)


class TuneOps(StoreReader, StoreLocks, StoreIdentity):
    """Publishing, listing and reading tune artifacts of stored builds."""

    def publish_tune(self, ref: str | Ref | EngineManifest, key: TuneKey, data: bytes, *, warmup_seconds: float,
                     artifacts: dict[str, int] | None = None) -> TuneRecord:
        """Store ``data`` (the tune artifact: vlmforge.runner.tune.bundle) for the build ``ref`` under ``key``; a second tune of
        the same key replaces the record. The build's manifest is not touched."""
        manifest = ref if isinstance(ref, EngineManifest) else self.resolve(ref)
        if key.fingerprint != manifest.fingerprint:
            raise IntegrityError(f"the tune key's fingerprint {key.fingerprint[:12]} is not that of {manifest.ref} "
                                 f"({manifest.fingerprint[:12]}): tune the engine of that build")
        self._require_store(f"tune {manifest.ref}")
        sha = hashlib.sha256(data).hexdigest()
        record = TuneRecord(model=manifest.model, build_id=manifest.build_id, key=key, sha256=sha, size=len(data),
                            created_at=utcnow(), by=actor(), warmup_seconds=warmup_seconds,
                            artifacts=dict(artifacts or {}))
        with self._writer_lock(f"tune {manifest.ref}") as lease, tempfile.TemporaryDirectory() as scratch:
            if self._size(blob_key(sha)) != len(data):
                source = Path(scratch) / "artifacts.bin"
                source.write_bytes(data)
                with TaskGroup(self.settings.workers) as group, self._backend_errors("upload"):
                    cleanup = self._schedule_upload(source, record.entry, group, NullSink(), verify=True)
                    try:
                        group.wait()
                    except BaseException:
                        if cleanup is not None:
                            cleanup()
                        raise
            lease.check()
            if self._size(blob_key(sha)) != len(data):
                raise IntegrityError(f"the tune artifact of {manifest.ref} vanished from {self.url} before its record "
                                     "was written: tune again")
            self._put(self._tune_key(record), record.model_dump_json(indent=2).encode())
        logger.info("stored the tune artifact of %s for %s (%d bytes)", manifest.ref, key.device, len(data))
        return record

    def tune_records(self, ref: str | Ref | EngineManifest) -> list[TuneRecord]:
        """The readable tune records of a build, newest first (unreadable ones are skipped with a warning)."""
        self._require_store(f"read the tune artifacts of {ref if not isinstance(ref, EngineManifest) else ref.ref}")
        manifest = ref if isinstance(ref, EngineManifest) else self.resolve(ref)
        records, refused = self._tune_records(manifest.model, manifest.build_id)
        for key, reason in refused:
            logger.warning("skipping %s: %s", key, reason)
        return sorted(records, key=lambda r: r.created_at, reverse=True)

    def read_tune(self, record: TuneRecord) -> bytes:
        """The artifact's bytes, checked against its sha256 by the same verified copy pulls use (IntegrityError for a
        damaged or missing blob)."""
        with tempfile.TemporaryDirectory() as scratch:
            dest = Path(scratch) / "artifacts.bin"
            with TaskGroup(self.settings.workers) as group, self._backend_errors("download"):
                self._schedule_download(record.entry, dest, group, NullSink(), lambda: None)
                group.wait()
            return dest.read_bytes()

    def _tune_key(self, record: TuneRecord) -> str:
        return f"{tune_prefix(record.model, record.build_id)}{record.key.digest[:32]}.json"

    def _tune_records(self, model: str, build_id: str) -> tuple[list[TuneRecord], list[Refused]]:
        records: list[TuneRecord] = []
        refused: list[Refused] = []
        for info in self._list(tune_prefix(model, build_id)):
            if not info.key.endswith(".json"):
                continue
            try:
                data, _ = self._get(info.key)
                record = parse_record(TuneRecord, data, what=f"tune record {info.key}",
                                      newer=("schema_version", TUNE_SCHEMA))
                if (record.model, record.build_id) != (model, build_id):
                    raise IntegrityError(f"refused tune record {info.key}: it describes {record.ref}")
            except (IntegrityError, NotFound) as exc:
                refused.append((info.key, str(exc)))
                continue
            records.append(record)
        return records, refused

    def _tune_builds(self, model: str) -> dict[str, list[str]]:
        """build id -> keys of its tune records (all of them, readable or not), for gc."""
        out: dict[str, list[str]] = {}
        prefix = f"models/{model}/tune/"
        for info in self._list(prefix):
            build_id = info.key[len(prefix):].split("/", 1)[0]
            out.setdefault(build_id, []).append(info.key)
        return out


def newest_matching(records: list[TuneRecord], key: TuneKey) -> tuple[TuneRecord | None, list[str]]:
    """The newest record whose key fits ``key`` (None if none), else the differences of the closest one."""
    best: tuple[int, list[str]] | None = None
    for record in records:
        differences = key.differences(record.key)
        if not differences:
            return record, []
        if best is None or len(differences) < best[0]:
            best = (len(differences), differences)
    return None, best[1] if best else []

