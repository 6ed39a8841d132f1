"""Revision watching: which models are watched, and whether their source has moved past the last build.

No Prefect here: the watch flow (flows/watch.py) runs :func:`check` for each target and emits the
``vlmforge.model.updated`` event when it reports a change; the build-engine deployment's trigger turns
the event into one build per model.

What is watched, first match wins:

1. the models given (``vlmforge watch --models``, the flow's ``models`` parameter);
2. the YAML file named by ``$VLMFORGE_WATCH``: a list of entries, or a mapping with a ``models`` list;
3. every model that has a build in the store.

An entry is a spec file (a path ending in .yaml/.yml/.json or holding a ``/``; relative paths are
relative to the watch file) read afresh on every check, or a model name: its spec is the one of its
newest build in the store (what is published is what gets rebuilt), else the catalog's. The spec is
sent with the event, so the build builds exactly what was checked.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from vlmforge.errors import SpecError, VlmforgeError
from vlmforge.sources import open_source
from vlmforge.specs.catalog import catalog_entry
from vlmforge.specs.schema import BuildSpec, load_spec_file, spec_from_dict
from vlmforge.store import ArtifactStore

log = logging.getLogger(__name__)

WATCH_ENV = "VLMFORGE_WATCH"
EVENT = "vlmforge.model.updated"
RESOURCE_PREFIX = "vlmforge.model."
SPEC_SUFFIXES = (".yaml", ".yml", ".json")


class WatchFailed(VlmforgeError):
    """Some watched models could not be checked; the others were (their rows are in ``rows``)."""

    def __init__(self, message: str, rows: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.rows = rows or []


class WatchTarget(BaseModel):
    """One watched model: its spec, and where the spec came from."""

    entry: str
    """As listed (a model name or a spec path)."""
    model: str
    origin: str
    """``catalog``, ``spec file PATH`` or ``store MODEL#BUILD_ID``."""
    spec: dict[str, Any] | None = None
    """The spec as JSON (what the event carries); None when it could not be loaded (see ``error``)."""
    error: str | None = None

    def build_spec(self) -> BuildSpec:
        if self.spec is None:
            raise SpecError(self.error or f"no spec for {self.model}")
        return spec_from_dict(self.spec, origin=self.origin)


class RevisionCheck(BaseModel):
    """The source's current revision against the revision of the model's last published build."""

    model: str
    source: str
    old_revision: str | None
    """The last published build's source revision; None if the model was never published."""
    new_revision: str | None
    """The source's revision now; None if it could not be resolved (see ``error``)."""
    changed: bool
    reason: str
    last_build: str | None = None
    error: str | None = None


def event_resource(model: str) -> dict[str, str]:
    """The Prefect resource of a model's events: ``vlmforge.model.<name>``."""
    return {"prefect.resource.id": f"{RESOURCE_PREFIX}{model}", "prefect.resource.name": model}


def event_payload(target: WatchTarget, result: RevisionCheck) -> dict[str, Any]:
    """What the build-engine trigger passes on: the model, its spec and both revisions."""
    return {"model": result.model, "spec": target.spec, "old_revision": result.old_revision,
            "new_revision": result.new_revision, "source": result.source, "reason": result.reason}


def _looks_like_file(entry: str) -> bool:
    return entry.endswith(SPEC_SUFFIXES) or "/" in entry


def read_watch_file(path: Path) -> list[str]:
    """The entries of a watch file: a YAML list, or a mapping with a ``models`` list."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise SpecError(f"cannot read the watch file: {exc}", location=str(path)) from None
    except yaml.YAMLError as exc:
        raise SpecError(f"not valid YAML: {exc}", location=str(path)) from None
    if isinstance(data, dict):
        data = data.get("models")
    if not isinstance(data, list) or not all(isinstance(item, str) and item.strip() for item in data):
        raise SpecError("a watch file is a list of model names and spec paths, or {models: [...]}", location=str(path))
    return [item.strip() for item in data]


def watch_entries(models: list[str] | None = None, store: ArtifactStore | None = None,
                  env: dict[str, str] | None = None) -> tuple[list[str], Path, str]:
    """(entries, directory relative paths start from, where the list came from)."""
    env = os.environ if env is None else env
    if models:
        return list(models), Path.cwd(), "the given models"
    watch_file = env.get(WATCH_ENV)
    if watch_file:
        path = Path(watch_file).expanduser()
        return read_watch_file(path), path.parent, f"{WATCH_ENV}={path}"
    if store is None:
        raise VlmforgeError("no models given, no $VLMFORGE_WATCH, and no store to list models from")
    return [summary.model for summary in store.list_models()], Path.cwd(), f"every model in {store.url}"


def resolve_target(entry: str, store: ArtifactStore, base: Path) -> WatchTarget:
    """The spec of one entry (errors are kept in the target, so one bad entry does not stop the rest)."""
    try:
        if _looks_like_file(entry):
            path = Path(entry).expanduser()
            path = path if path.is_absolute() else base / path
            spec = load_spec_file(path)
            return WatchTarget(entry=entry, model=spec.name, origin=f"spec file {path}", spec=spec.model_dump(mode="json"))
        manifests = store.manifests(entry)
        if manifests:
            newest = manifests[0]
            spec = spec_from_dict(newest.spec, origin=f"store {newest.ref}")
            return WatchTarget(entry=entry, model=spec.name, origin=f"store {newest.ref}", spec=spec.model_dump(mode="json"))
        data = catalog_entry(entry)
        spec = spec_from_dict(data, origin=f"catalog:{entry}")
        return WatchTarget(entry=entry, model=spec.name, origin="catalog", spec=spec.model_dump(mode="json"))
    except VlmforgeError as exc:
        return WatchTarget(entry=entry, model=entry.rsplit("/", 1)[-1], origin="unresolved", error=str(exc))


def watch_targets(store: ArtifactStore, models: list[str] | None = None,
                  env: dict[str, str] | None = None) -> list[WatchTarget]:
    """Every watched model with its spec; a model listed twice is an error."""
    entries, base, where = watch_entries(models, store, env)
    log.info("watching %d models from %s", len(entries), where)
    targets = [resolve_target(entry, store, base) for entry in entries]
    seen: dict[str, str] = {}
    for target in targets:
        if target.error is None and target.model in seen:
            raise VlmforgeError(f"model {target.model} is watched twice ({seen[target.model]} and {target.entry}): "
                                "list it once")
        seen[target.model] = target.entry
    return targets


def check(spec: BuildSpec, store: ArtifactStore) -> RevisionCheck:
    """Resolve the source's revision now and compare it with the model's newest published build.

    Changed when there is no build yet, when the newest build came from another source URI, or when its
    revision differs. Raises SourceError when the source cannot be resolved.
    """
    manifests = store.manifests(spec.name)
    newest = manifests[0] if manifests else None
    new = open_source(spec.source).resolve_revision()
    base = {"model": spec.name, "source": spec.source, "new_revision": new}
    if newest is None:
        return RevisionCheck(**base, old_revision=None, changed=True, reason="no published build yet")
    old = newest.source.revision
    last = newest.build_id
    if newest.source.uri != spec.source:
        return RevisionCheck(**base, old_revision=old, last_build=last, changed=True,
                             reason=f"the last build ({last}) came from {newest.source.uri}")
    if old != new:
        return RevisionCheck(**base, old_revision=old, last_build=last, changed=True,
                             reason=f"new revision (the last build {last} has {_short(old)})")
    return RevisionCheck(**base, old_revision=old, last_build=last, changed=False,
                         reason=f"unchanged since build {last}")


def check_target(target: WatchTarget, store: ArtifactStore) -> RevisionCheck:
    """:func:`check` for one target, with its errors (bad spec, unreachable source) reported in the result."""
    source = (target.spec or {}).get("source", "")
    if target.error is not None:
        return RevisionCheck(model=target.model, source=source, old_revision=None, new_revision=None, changed=False,
                             reason="not checked: the spec cannot be loaded", error=target.error)
    try:
        return check(target.build_spec(), store)
    except VlmforgeError as exc:
        return RevisionCheck(model=target.model, source=source, old_revision=None, new_revision=None, changed=False,
                             reason="not checked: the source cannot be resolved", error=str(exc))


def _short(revision: str | None) -> str:
    if revision is None:
        return "none"
    scheme, sep, digest = revision.rpartition(":")
    return f"{scheme}{sep}{digest[:12]}" if len(digest) > 12 else revision


def rows_markdown(rows: list[dict[str, Any]]) -> str:
    """The watch run's report: one line per model."""
    lines = ["# Model revisions", "", "| model | status | old revision | new revision | reason |", "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['model']} | {row['status']} | `{_short(row.get('old_revision'))}` | "
                     f"`{_short(row.get('new_revision'))}` | {row.get('error') or row['reason']} |")
    changed = sum(row["status"] == "announced" for row in rows)
    lines += ["", f"{changed} of {len(rows)} models announced as updated (`{EVENT}`)."]
    return "\n".join(lines)
