"""What the store's operations return: publish, pull and alias outcomes, listings and the gc report."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, Field

from vlmforge.artifacts.manifest import EngineManifest
from vlmforge.store.records import IncompleteUpload


class AliasMove(BaseModel):
    """Outcome of moving an alias."""

    model: str
    alias: str
    previous: str | None
    build_id: str = Field(description="the build the alias points to afterwards")
    moved: bool
    note: str = ""


class PublishResult(BaseModel):
    """Outcome of a publish."""

    manifest: EngineManifest
    created: bool = Field(description="False when this build (same fingerprint) was already published")
    uploaded_blobs: int
    uploaded_bytes: int
    reused_blobs: int
    reused_bytes: int
    aliases: list[AliasMove]
    hash_seconds: float
    transfer_seconds: float
    seconds: float


class BlobStats(BaseModel):
    """Blobs a publish uploaded and found already stored."""

    uploaded_blobs: int = 0
    uploaded_bytes: int = 0
    reused_blobs: int = 0
    reused_bytes: int = 0


class PullCheck(StrEnum):
    """How the files of a pulled engine were checked: every byte hashed, or presence and size only."""

    SHA256 = "sha256"
    SIZES = "sizes"


class PullResult(BaseModel):
    """Outcome of a pull, saying honestly what was checked."""

    manifest: EngineManifest
    dest: str
    reused: bool = Field(description="dest already held this build intact: nothing was downloaded")
    check: PullCheck = Field(description="the weakest check any file got (sha256: every byte was hashed)")
    downloaded_files: int = 0
    downloaded_bytes: int = 0
    resumed_files: int = Field(default=0, description="files kept from an interrupted pull of the same build, or from "
                                                      "the part of it dest held")
    repaired: list[str] = Field(default_factory=list, description="damage found in dest, which was pulled again")
    excluded: list[str] = Field(default_factory=list, description="top-level folders dest holds none of (left out)")

    @property
    def summary(self) -> str:
        """One line for people: what is in ``dest`` and how it was checked."""
        n = len([e for e in self.manifest.files if "/" not in e.path or e.path.split("/", 1)[0] not in self.excluded])
        without = f" (without {', '.join(f'{name}/' for name in self.excluded)})" if self.excluded else ""
        if self.reused:
            if self.check is PullCheck.SHA256:
                return f"{self.dest} already holds it{without}: {n} files re-hashed, every sha256 matches"
            return (f"{self.dest} already holds it{without}: {n} files present with the expected sizes"
                    " (not re-hashed; --verify re-hashes them)")
        text = f"{self.downloaded_files} files downloaded into {self.dest}{without}, sha256 checked"
        if self.resumed_files:
            how = "re-hashed" if self.check is PullCheck.SHA256 else "sizes checked, not re-hashed"
            text += f"; {self.resumed_files} kept from an interrupted or partial pull ({how})"
        if self.repaired:
            more = f" and {len(self.repaired) - 1} more" if len(self.repaired) > 1 else ""
            text += f"; replaced a damaged copy ({self.repaired[0]}{more})"
        return text


class BuildSummary(BaseModel):
    """One line of a build listing."""

    model: str
    build_id: str
    created_at: datetime
    toolchain: str
    files: int
    size: int
    aliases: list[str]
    gpu_name: str | None
    compute_capability: str | None
    world_size: int
    fingerprint: str


class ModelSummary(BaseModel):
    """One line of a model listing."""

    model: str
    builds: int
    aliases: dict[str, str]


class GcBuild(BaseModel):
    """A build considered by gc, with why it is kept or deleted."""

    model: str
    build_id: str
    created_at: datetime
    reasons: list[str]


class GcBlob(BaseModel):
    """A blob gc deletes (or would delete): no kept build references it and it is older than the grace period."""

    sha256: str
    size: int
    modified: datetime


class GcReport(BaseModel):
    """What gc kept and deleted (or would delete, in a dry run): everything ``--apply`` removes is listed."""

    applied: bool
    keep: int
    grace_seconds: float = Field(description="blobs and upload leftovers younger than this are never collected")
    kept: list[GcBuild]
    deleted: list[GcBuild]
    blobs_kept: int
    bytes_kept: int
    blobs_deleted: int
    bytes_deleted: int
    blobs: list[GcBlob] = Field(description="the blobs deleted (or that --apply would delete)")
    blobs_young: int = Field(description="unreferenced blobs kept because they are younger than the grace period")
    dangling_aliases: list[str]
    missing_blobs: list[str]
    refused_manifests: list[str]
    refused_aliases: list[str] = Field(default_factory=list)
    reasons: dict[str, str] = Field(default_factory=dict, description="why each refused record is unreadable")
    refusal: str | None = Field(default=None, description="why --apply refuses to collect (unreadable records)")
    ignored_unreadable: bool = False
    incomplete: list[IncompleteUpload] = Field(description="upload leftovers removed (or that --apply would remove)")
    incomplete_cleaned: int
    broken_locks: list[str] = Field(default_factory=list, description="locks of dead holders that gc removed")
    tune_records: list[str] = Field(default_factory=list,
                                    description="tune records of deleted or missing builds, removed (or to remove)")
