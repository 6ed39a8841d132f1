"""The small records the store keeps besides manifests: the store marker, alias records and locks.

All of them are read from a possibly shared location, so each is validated when read (names are single safe
path components, versions newer than this code are refused) and a bad one is reported, never trusted.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Literal, TypeVar

from pydantic import AwareDatetime, BaseModel, Field, ValidationError

from vlmforge.artifacts.manifest import AliasName, BuildId, ModelName
from vlmforge.errors import IntegrityError, StoreError

LAYOUT_VERSION = 1
"""Layout of the store written by this code; a store marker with a newer one is refused."""

_R = TypeVar("_R", bound=BaseModel)


class ObjectInfo(BaseModel):
    """A stored object: key relative to the store root, size and modification time."""

    key: str
    size: int
    modified: datetime


class IncompleteUpload(BaseModel):
    """A leftover of an interrupted upload, which gc removes once it is older than the grace period."""

    kind: Literal["scratch file", "multipart upload"]
    key: str = Field(description="key relative to the store root (scratch files: path relative to the root)")
    started: datetime
    upload_id: str | None = Field(default=None, description="S3 multipart upload id")


class StoreInfo(BaseModel):
    """Content of the store marker (``vlmforge-store.json``): what makes a location a vlmforge store."""

    format: Literal["vlmforge-store"] = "vlmforge-store"
    layout_version: int = Field(default=LAYOUT_VERSION, ge=1)
    created_at: AwareDatetime
    created_by: str
    adopted: bool = Field(default=False, description="marker added to a store made before markers existed")


class LockInfo(BaseModel):
    """Content of a lock object: who holds it, since when, and until when its lease runs.

    Whether a holder is dead is decided from the process identity on its own host (pid and start time, in the
    same boot and pid namespace) and from the lease elsewhere; locks written before leases existed carry neither
    ``lease_expires`` nor ``start_time``.
    """

    kind: Literal["writer", "gc"]
    purpose: str
    host: str
    pid: int
    by: str
    created_at: AwareDatetime
    start_time: int | None = Field(default=None, description="the holder's start time (clock ticks since boot)")
    boot_id: str | None = Field(default=None, description="/proc/sys/kernel/random/boot_id of the holder's host")
    pid_namespace: str | None = Field(default=None, description="the holder's pid namespace (/proc/self/ns/pid)")
    lease_expires: AwareDatetime | None = Field(default=None, description="renewed by the holder's heartbeat")
    token: str | None = Field(default=None, description="unique per acquisition: recognises our own lock")


class AliasEvent(BaseModel):
    """One move of an alias."""

    build_id: BuildId
    previous: BuildId | None
    at: datetime
    by: str


class AliasRecord(BaseModel):
    """Content of an alias object: the build it points to, plus its history (newest first)."""

    schema_version: Literal[1] = 1
    model: ModelName
    alias: AliasName
    build_id: BuildId
    updated_at: datetime
    by: str
    token: str = Field(description="unique per write; recognises our own write after a lost response")
    history: list[AliasEvent] = Field(default_factory=list)

    @classmethod
    def from_json(cls, data: bytes, *, key: str, model: str, alias: str) -> AliasRecord:
        """Parse and validate a stored alias record; IntegrityError ("refused alias record KEY: why") if bad."""
        record = parse_record(cls, data, what=f"alias record {key}", newer=("schema_version", 1))
        if (record.model, record.alias) != (model, alias):
            raise IntegrityError(
                f"refused alias record {key}: it describes {record.model}@{record.alias}, not {model}@{alias}"
            )
        return record


def parse_record(kind: type[_R], data: bytes, *, what: str, newer: tuple[str, int] | None = None) -> _R:
    """Validate a stored JSON record; IntegrityError naming ``what`` and the first problems if it is not acceptable.

    ``newer=(field, supported)``: a record whose version field is above ``supported`` is refused with "upgrade".
    """
    try:
        raw: Any = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise IntegrityError(f"refused {what}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise IntegrityError(f"refused {what}: not a JSON object")
    if newer is not None:
        version = raw.get(newer[0])
        if isinstance(version, int) and version > newer[1]:
            raise IntegrityError(
                f"refused {what}: {newer[0]} {version} is newer than this vlmforge supports ({newer[1]}); upgrade"
                " vlmforge"
            )
    try:
        return kind.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(x) for x in first["loc"])
        raise IntegrityError(f"refused {what}: {loc + ': ' if loc else ''}{first['msg']}") from None


def parse_store_info(data: bytes, where: str) -> StoreInfo:
    """Read a store marker; StoreError if it is not one this code can use (e.g. a newer layout)."""
    try:
        return parse_record(StoreInfo, data, what=f"store marker {where}", newer=("layout_version", LAYOUT_VERSION))
    except IntegrityError as exc:
        raise StoreError(str(exc)) from None
