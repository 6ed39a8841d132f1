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

Validation thresholds (:data:`GATE_FIELDS`) only gate publishing: they are not part of the engine's fingerprint, so
publishing after a threshold-only change keeps the stored build of the same engine, with the key of the thresholds
it was validated against. Its key is therefore compared with this spec's key under the stored build's own
thresholds, and its recorded figures with this spec's thresholds: a build whose measured token agreement and logit
error meet them is this spec's build (validation would measure the same figures again: what it measures, the engine,
the reference, ``max_new_tokens`` and the prompt, are all in the key). Figures that miss them leave the flow to
validate again and refuse.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmforge.build.fingerprint import SPEC_IGNORED_FIELDS
from vlmforge.build.pipeline import BUILD_KEY, calibration_of, hf_fingerprints
from vlmforge.build.revisions import RevisionMemo
from vlmforge.build.workdir import Workdir
from vlmforge.sources import open_source
from vlmforge.specs.schema import BuildSpec, Toolchain, ValidationSettings
from vlmforge.store import open_store
from vlmforge.store.base import build_key

log = logging.getLogger(__name__)

GATE_FIELDS: tuple[str, ...] = tuple(sorted(field.removeprefix("validation.") for field in SPEC_IGNORED_FIELDS
                                            if field.startswith("validation.")))
"""The validation settings that only gate publishing (the fingerprint's ignore list): min_token_agreement and
max_logit_error."""
Gate = tuple[tuple[str, Any], ...]


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

    The store is read first: a stored build can only match if its key is the key of this spec (under the thresholds
    it was validated against, which its figures must meet under this spec's) at the revision it was built from, so the source's current revision is resolved only when such a build exists (a first build, or
    a changed spec, costs no resolution). Errors reaching the source or the store propagate: the caller decides
    whether to build anyway.
    """
    with open_store(store_url) as store:
        keys = functools.cache(lambda gate: functools.cache(build_keys(with_gate(spec, gate), toolchain, workdir)))
        key_at = keys(gate_of(spec.validation))
        candidates = [m for m in store.manifests(spec.name)
                      if m.toolchain == toolchain.value and m.source.uri == spec.source and m.source.revision
                      and m.extra.get(BUILD_KEY) == keys(stored_gate(m, spec))(m.source.revision)
                      and meets(m.validation, spec.validation)]
        if not candidates:
            log.info("%s: no stored build of this spec (and libraries) in %s", spec.name, store.url)
            return None
        revision = RevisionMemo(workdir).resolve(open_source(spec.source))
        match = next((m for m in candidates if m.source.revision == revision), None)
        if match is None:
            log.info("%s: the source moved on to %s since its stored builds", spec.name, revision)
            return None
        if stored_gate(match, spec) != gate_of(spec.validation):
            log.info("%s: %s was validated against other thresholds; its recorded figures meet this spec's",
                     spec.name, match.ref)
        placed = {}
        for alias in aliases:
            stays = store.alias_in_place(match, alias)
            if stays is None:
                log.info("%s: %s is published, but publishing it would move %s", spec.name, match.ref, alias)
                return None
            placed[alias] = stays.build_id
        return PublishedBuild(manifest=match, store_url=store.url, key=key_at(revision), aliases=placed)


def gate_of(settings: ValidationSettings) -> Gate:
    """The thresholds of ``settings`` (:data:`GATE_FIELDS`), hashable."""
    return tuple((name, getattr(settings, name)) for name in GATE_FIELDS)


def stored_gate(manifest: Any, spec: BuildSpec) -> Gate:
    """The thresholds the stored build was validated against (from its recorded spec); this spec's where the
    record lacks them or holds values this vlmforge would refuse (its key then matches only under this spec's)."""
    recorded = (manifest.spec or {}).get("validation")
    if not isinstance(recorded, dict):
        return gate_of(spec.validation)
    merged = spec.validation.model_dump() | {name: recorded[name] for name in GATE_FIELDS if name in recorded}
    try:
        return gate_of(ValidationSettings.model_validate(merged))
    except ValueError:
        return gate_of(spec.validation)


def with_gate(spec: BuildSpec, gate: Gate) -> BuildSpec:
    """``spec`` with the thresholds ``gate`` (from :func:`gate_of` or :func:`stored_gate`: already validated)."""
    if gate == gate_of(spec.validation):
        return spec
    return spec.model_copy(update={"validation": spec.validation.model_copy(update=dict(gate))})


def meets(recorded: dict[str, Any], settings: ValidationSettings) -> bool:
    """Whether a stored build's recorded validation passes ``settings``' thresholds, as the validate stages decide:
    token agreement at least ``min_token_agreement``, and the logit error at most ``max_logit_error`` where the
    toolchain measured it (TensorRT-LLM's runner records None: not measured). The figures are recorded rounded (4
    and 6 decimals), so a threshold within that rounding of a figure is judged on the rounded figure."""
    agreement, error = recorded.get("token_agreement"), recorded.get("max_logit_error", "missing")
    if not isinstance(agreement, (int, float)) or agreement < settings.min_token_agreement:
        return False
    return error is None or (isinstance(error, (int, float)) and error <= settings.max_logit_error)
