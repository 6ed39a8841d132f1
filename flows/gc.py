"""The gc flow: keep the newest ``keep`` builds per model (and every alias target) in the store, drop the rest.

prefect.yaml runs it weekly as a dry run: its artifacts list what would go and why; run it with
``apply=true`` to delete (the store's gc lock keeps publishers out meanwhile).
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from vlmforge_tasks import store as t
from vlmforge.store import GcReport


def gc_markdown(report: GcReport, store: str) -> str:
    verb = "Deleted" if report.applied else "Would delete (dry run)"
    lines = [f"# Store gc of `{store}`", "",
             f"{verb}: {len(report.deleted)} builds, {report.blobs_deleted} blobs ({report.bytes_deleted} bytes), "
             f"{len(report.incomplete)} upload leftovers. "
             f"Kept: {len(report.kept)} builds (the newest {report.keep} per model and alias targets), "
             f"{report.blobs_kept} blobs ({report.bytes_kept} bytes), of which {report.blobs_young} unreferenced "
             f"but younger than the grace period ({report.grace_seconds:.0f} s)."]
    warnings = ([f"dangling alias {a}" for a in report.dangling_aliases]
                + [f"blob {b} of a kept build is missing" for b in report.missing_blobs]
                + [f"unreadable {k}: {report.reasons.get(k, '')}"
                   for k in report.refused_manifests + report.refused_aliases]
                + ([f"apply refuses while records are unreadable: {report.refusal}"] if report.refusal else [])
                + [f"broke the lock of a dead holder: {b}" for b in report.broken_locks])
    if warnings:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in warnings]
    return "\n".join(lines) + "\n"


@flow(name="gc-store", flow_run_name="gc-store", validate_parameters=True)
def gc_store(keep: int = 5, apply: bool = False, store: str | None = None, break_locks: bool = False,
             grace_minutes: float = 60.0, ignore_unreadable: bool = False) -> dict[str, Any]:
    """Garbage-collect the store; a dry run unless ``apply``. Leaves a report and a table of every build's fate.

    Blobs and upload leftovers younger than ``grace_minutes`` are kept; ``apply`` refuses while a manifest or alias
    record is unreadable unless ``ignore_unreadable`` (see docs/store.md).
    """
    report = t.gc(store, keep, apply, break_locks, grace_minutes, ignore_unreadable)
    where = store or "the default store"
    create_markdown_artifact(gc_markdown(report, where), key="gc-store", description=f"gc of {where}")
    verb = "deleted" if report.applied else "would delete"
    rows = [{"build": f"{b.model}#{b.build_id}", "created": f"{b.created_at:%Y-%m-%d %H:%M}", "action": action,
             "why": ", ".join(b.reasons)} for action, builds in (("keep", report.kept), (verb, report.deleted))
            for b in builds]
    create_table_artifact(rows, key="gc-store-builds", description="every build gc considered")
    return report.model_dump(mode="json")
