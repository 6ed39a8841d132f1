"""Is this build already published? Answered from the spec, the source revision and the store, before any server
starts or any stage runs.

Every manifest records its build's key (``extra["build_key"]``): the fingerprint chain of its stages from the
source revision to validation (:meth:`vlmforge.build.pipeline.HfFingerprints.build_key`,
:meth:`vlmforge.build.trtllm_pipeline.TrtllmPipeline.build_key`). A stored manifest with the key this spec gives
for the source's current revision is exactly the build the flow would produce and validate; when each alias asked
for already points to it (or to a newer build, which publishing keeps), running the flow would change nothing.

The source's current revision is resolved only when the store holds a build of this spec (its key at its own
revision matches): as the build resolves it (a hub API call for ``hf://``, a listing for ``s3://``, hashing the
directory for ``file://``), except ``tiny://``, whose revision is remembered per code and library versions
(:mod:`vlmforge.build.revisions`). Manifests without a key (published before keys were recorded) never
match: the flow runs, and publishes nothing when the engine's fingerprint is stored already.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmforge.build.pipeline import BUILD_KEY, calibration_of, hf_fingerprints
from vlmforge.build.revisions import RevisionMemo
from vlmforge.build.workdir import Workdir
from vlmforge.sources import open_source
from vlmforge.specs.schema import BuildSpec, Toolchain
from vlmforge.store import open_store
from vlmforge.store.base import build_key

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PublishedBuild:
    """A stored build the flow would reproduce, and where its aliases point."""

    manifest: Any
    """The stored :class:`~vlmforge.artifacts.manifest.EngineManifest`."""
    store_url: str
    key: str
    aliases: dict[str, str]
    """Each alias asked for -> the build it points to (this one, or a newer one publishing would keep)."""

    @property
    def manifest_url(self) -> str:
        return f"{self.store_url.rstrip('/')}/{build_key(self.manifest.model, self.manifest.build_id)}"

    def summary(self, toolchain: Toolchain) -> dict[str, Any]:
        """The build flow's summary for this build, as a run that changed nothing would return it."""
        manifest = self.manifest
        validation = manifest.validation
        return {
            "model": manifest.model, "toolchain": toolchain.value, "build_id": manifest.build_id,
            "fingerprint": manifest.fingerprint, "store": self.store_url, "created": False, "aliases": self.aliases,
            "validation": {k: validation.get(k) for k in ("token_agreement", "max_logit_error", "vision_ms", "llm_ms",
                                                          "e2e_ms")},
            "stages": {}, "revision": manifest.source.revision, "expected_revision": None,
            "uploaded_bytes": 0, "reused_bytes": 0, "already_published": True, "manifest_url": self.manifest_url,
        }


def build_keys(spec: BuildSpec, toolchain: Toolchain, workdir: Path) -> Callable[[str], str]:
    """revision -> the key the build of ``spec`` from that revision records in its manifest."""
    if toolchain is Toolchain.TRTLLM:
        from vlmforge.build.trtllm_pipeline import TrtllmPipeline

        # The plan's paths lie under the work dir, as the flow's do; constructing it refuses outside the container.
        return TrtllmPipeline(spec, Workdir(workdir), on_event=lambda line: None).build_key
    fingerprints = hf_fingerprints(spec)
    calibration = calibration_of(fingerprints.resolved)
    return lambda revision: fingerprints.build_key(revision, calibration)


def find_published(spec: BuildSpec, toolchain: Toolchain, *, store_url: str | None, workdir: Path,
                   aliases: Sequence[str] = ("latest",)) -> PublishedBuild | None:
    """The stored build the flow would produce for ``spec`` with every alias in ``aliases`` already in place, or
    None (never published, an alias would move, or the source moved on: the flow has work to do).

    The store is read first: a stored build can only match if its key is the key of this spec at the revision it
    was built from, so the source's current revision is resolved only when such a build exists (a first build, or
    a changed spec, costs no resolution). Errors reaching the source or the store propagate: the caller decides
    whether to build anyway.
    """
    with open_store(store_url) as store:
        key_at = functools.cache(build_keys(spec, toolchain, workdir))
        candidates = [m for m in store.manifests(spec.name)
                      if m.toolchain == toolchain.value and m.source.uri == spec.source and m.source.revision
                      and m.extra.get(BUILD_KEY) == key_at(m.source.revision)]
        if not candidates:
            log.info("%s: no stored build of this spec (and libraries) in %s", spec.name, store.url)
            return None
        revision = RevisionMemo(workdir).resolve(open_source(spec.source))
        match = next((m for m in candidates if m.source.revision == revision), None)
        if match is None:
            log.info("%s: the source moved on to %s since its stored builds", spec.name, revision)
            return None
        placed = {}
        for alias in aliases:
            stays = store.alias_in_place(match, alias)
            if stays is None:
                log.info("%s: %s is published, but publishing it would move %s", spec.name, match.ref, alias)
                return None
            placed[alias] = stays.build_id
        return PublishedBuild(manifest=match, store_url=store.url, key=key_at(revision), aliases=placed)
