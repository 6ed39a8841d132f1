"""Engine build manifest: the immutable, validated description of one published engine build."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from vlmforge.errors import IntegrityError

SCHEMA_VERSION = 1
"""Manifest schema version written by this code; readers refuse newer versions."""

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
"""Model names, aliases and build ids: one safe path/key component each."""

SHA256_PATTERN = r"^[0-9a-f]{64}$"

MAX_FILE_SIZE = 5 * 1024**4
"""Largest file a manifest may list: 5 TiB, the largest object S3 stores (a bigger size is a crafted manifest)."""

RESERVED_PREFIX = ".vlmforge"
"""Top-level names starting with this are reserved for the store (pull markers, temp files)."""

_NAME_RE = re.compile(NAME_PATTERN)
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


def check_name(value: str, what: str) -> str:
    """Return ``value`` if it is a valid model/alias/build name, else raise ValueError naming ``what``."""
    if not _NAME_RE.match(value):
        raise ValueError(
            f"invalid {what} {value!r}: use 1-128 characters from [A-Za-z0-9._-], starting with a letter or digit"
        )
    return value


def _named(what: str) -> AfterValidator:
    return AfterValidator(lambda value: check_name(value, what))


ModelName = Annotated[str, _named("model name")]
"""A model's name in the store and the catalog (:func:`check_name`)."""
AliasName = Annotated[str, _named("alias")]
"""An alias of a model's builds (:func:`check_name`)."""
BuildId = Annotated[str, _named("build id")]
"""One build's id (:func:`check_name`)."""


def check_relative_path(path: str) -> str:
    """Validate a manifest file path: relative, POSIX, no '..', '.', empty parts, backslashes or reserved names."""
    if not path:
        raise ValueError("empty file path")
    if len(path) > 1024:
        raise ValueError(f"file path too long ({len(path)} > 1024 characters)")
    if path.startswith("/"):
        raise ValueError(f"absolute file path {path!r} is not allowed")
    if "\\" in path:
        raise ValueError(f"backslash in file path {path!r} is not allowed")
    if _CONTROL_RE.search(path):
        raise ValueError(f"control character in file path {path!r} is not allowed")
    parts = path.split("/")
    if any(part == "" for part in parts):
        raise ValueError(f"empty component in file path {path!r} is not allowed")
    if any(part in (".", "..") for part in parts):
        raise ValueError(f"'.' or '..' component in file path {path!r} is not allowed")
    if re.match(r"^[A-Za-z]:$", parts[0]):
        raise ValueError(f"drive-letter file path {path!r} is not allowed")
    if parts[0].startswith(RESERVED_PREFIX):
        raise ValueError(f"file path {path!r} uses the reserved prefix {RESERVED_PREFIX!r}")
    return path


def new_build_id(fingerprint: str, created_at: datetime) -> str:
    """Build id sortable by time and unique per (second, fingerprint): ``20261126T051500Z-1a2b3c4d``."""
    stamp = created_at.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{fingerprint[:8]}"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FileEntry(_Frozen):
    """One file of an engine directory and the blob holding its content."""

    path: str
    sha256: str = Field(pattern=SHA256_PATTERN)
    size: int = Field(ge=0)

    @field_validator("path")
    @classmethod
    def _valid_path(cls, value: str) -> str:
        return check_relative_path(value)

    @field_validator("size")
    @classmethod
    def _possible_size(cls, value: int) -> int:
        if value > MAX_FILE_SIZE:
            raise ValueError(f"{value} bytes is larger than any store holds (at most {MAX_FILE_SIZE}, 5 TiB)")
        return value


class SourceInfo(_Frozen):
    """Where the model weights came from."""

    uri: str
    revision: str | None = None


class HardwareInfo(_Frozen):
    """The machine an engine was built on (engines are tied to a GPU architecture)."""

    gpu_name: str | None = None
    compute_capability: str | None = Field(default=None, pattern=r"^[0-9]+\.[0-9]+$")
    gpu_count: int = Field(default=0, ge=0)
    cpu: str | None = None


class EngineManifest(_Frozen):
    """Immutable description of one engine build; written to the store last, after all its blobs."""

    schema_version: Literal[1] = SCHEMA_VERSION
    model: ModelName
    build_id: BuildId
    fingerprint: str = Field(pattern=SHA256_PATTERN)
    created_at: AwareDatetime
    toolchain: Literal["hf", "trtllm"]
    spec: dict[str, Any] = Field(default_factory=dict)
    derived: dict[str, Any] = Field(default_factory=dict)
    source: SourceInfo
    versions: dict[str, str] = Field(default_factory=dict)
    hardware: HardwareInfo = Field(default_factory=HardwareInfo)
    world_size: int = Field(default=1, ge=1)
    files: tuple[FileEntry, ...] = ()
    validation: dict[str, Any] = Field(default_factory=dict)
    links: dict[str, str] = Field(default_factory=dict)
    extra: dict[str, Any] = Field(default_factory=dict)

    @field_validator("created_at")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        return value.astimezone(UTC)

    @model_validator(mode="after")
    def _consistent_files(self) -> EngineManifest:
        seen: set[str] = set()
        for entry in self.files:
            if entry.path in seen:
                raise ValueError(f"duplicate file path {entry.path!r}")
            seen.add(entry.path)
        dirs = {"/".join(p.split("/")[:i]) for p in seen for i in range(1, p.count("/") + 1)}
        clash = sorted(seen & dirs)
        if clash:
            raise ValueError(f"file path {clash[0]!r} is also used as a directory")
        return self

    @classmethod
    def create(cls, *, fingerprint: str, created_at: datetime | None = None, **fields: Any) -> EngineManifest:
        """Build a manifest with ``created_at`` defaulting to now and a fresh time-sortable build id."""
        when = (created_at or datetime.now(UTC)).astimezone(UTC)
        fields.setdefault("build_id", new_build_id(fingerprint, when))
        return cls(fingerprint=fingerprint, created_at=when, **fields)

    @property
    def ref(self) -> str:
        """The exact reference ``MODEL#BUILD_ID`` of this build."""
        return f"{self.model}#{self.build_id}"

    @property
    def total_size(self) -> int:
        """Sum of the sizes of all files, in bytes."""
        return sum(entry.size for entry in self.files)

    def sort_key(self) -> tuple[datetime, str]:
        """Order of builds by age: newer sorts later."""
        return (self.created_at, self.build_id)

    def with_files(self, files: list[FileEntry] | tuple[FileEntry, ...]) -> EngineManifest:
        """A validated copy with ``files`` replaced (sorted by path)."""
        data = self.model_dump()
        data["files"] = sorted((f.model_dump() for f in files), key=lambda f: f["path"])
        return EngineManifest.model_validate(data)

    def to_json(self) -> bytes:
        """The canonical serialized form stored in the artifact store."""
        return self.model_dump_json(indent=2).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes, *, where: str = "manifest") -> EngineManifest:
        """Parse and validate a stored manifest; raise IntegrityError (refused manifest) if it is not acceptable."""
        try:
            raw = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise IntegrityError(f"refused {where}: not valid JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise IntegrityError(f"refused {where}: not a JSON object")
        version = raw.get("schema_version")
        if isinstance(version, int) and version > SCHEMA_VERSION:
            raise IntegrityError(
                f"refused {where}: schema_version {version} is newer than this vlmforge supports"
                f" ({SCHEMA_VERSION}); upgrade vlmforge"
            )
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise IntegrityError(f"refused {where}: {_first_errors(exc)}") from None


def _first_errors(exc: ValidationError, limit: int = 3) -> str:
    parts = []
    for err in exc.errors()[:limit]:
        loc = ".".join(str(x) for x in err["loc"])
        parts.append(f"{loc}: {err['msg']}" if loc else err["msg"])
    more = exc.error_count() - limit
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")
