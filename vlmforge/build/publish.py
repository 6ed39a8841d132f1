"""Publishing a built engine: one fingerprint is published once; a rerun only re-asserts its aliases."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmforge.store import open_store


@dataclass(frozen=True)
class PublishOutcome:
    """Where a build went and whether anything moved."""

    manifest: Any
    store_url: str
    created: bool
    uploaded_bytes: int
    reused_bytes: int
    aliases: dict[str, str]

    @property
    def summary(self) -> str:
        ref = f"{self.manifest.model}#{self.manifest.build_id}"
        if not self.created:
            return f"{ref} was already published in {self.store_url} (same fingerprint): nothing uploaded"
        return (f"published {ref} to {self.store_url}: {self.uploaded_bytes} bytes uploaded, "
                f"{self.reused_bytes} bytes already stored")


def publish_engine(store_url: str | None, engine_dir: Path, manifest: Any, *, aliases: tuple[str, ...] = ("latest",)) -> PublishOutcome:
    """Publish ``engine_dir`` under ``manifest`` unless a build with the same fingerprint exists already."""
    with open_store(store_url) as store:
        existing = store.find_by_fingerprint(manifest.model, manifest.fingerprint)
        result = store.publish(engine_dir, existing or manifest, aliases=aliases)
        return PublishOutcome(
            manifest=result.manifest, store_url=store.url, created=existing is None and result.created,
            uploaded_bytes=result.uploaded_bytes, reused_bytes=result.reused_bytes,
            aliases={move.alias: move.build_id for move in result.aliases},
        )
