"""The watch flow: find the watched models whose source moved past their last build and announce them.

For each watched model (see :mod:`vlmforge.build.watch`) it resolves the source's revision and compares it
with the newest published build; on a change it emits ``vlmforge.model.updated`` (resource
``vlmforge.model.<name>``, payload: model, spec, old and new revision), which the build-engine
deployment's trigger turns into one build per model. A revision already announced in the last
``reannounce_after_hours`` is not announced again (its build is running, or failed: the failure is in
that run), so a broken upstream revision does not start a build every half hour; 0 announces every
changed model (the nightly safety-net run). A table and a markdown report show in the UI.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from vlmforge_tasks import watch as t
from vlmforge.build.watch import WatchFailed, rows_markdown

ARTIFACT_KEY = "watch-models"


@flow(name="watch-models", flow_run_name="watch-models", validate_parameters=True)
def watch_models(models: list[str] | None = None, store: str | None = None,
                 reannounce_after_hours: float = 24.0) -> list[dict[str, Any]]:
    """Check every watched model's source revision; announce the changed ones. One row per model."""
    logger = get_run_logger()
    targets = t.list_targets(models, store)
    checks = [t.check_revision.submit(target, store) for target in targets]  # sources are resolved at once
    rows: list[dict[str, Any]] = []
    for target, future in zip(targets, checks):
        result = future.result()
        row: dict[str, Any] = {**result.model_dump(mode="json"), "status": "unchanged", "event_id": None}
        if result.error:
            row["status"] = "error"
        elif result.changed:
            assert result.new_revision is not None
            previous = t.previous_announcement(result.model, result.new_revision, reannounce_after_hours)
            if previous is not None:
                row["status"] = "already announced"
                row["event_id"] = previous["event_id"]
                row["reason"] += (f"; announced at {previous['occurred']} (its build runs or failed; announced again "
                                  f"after {reannounce_after_hours:g} h)")
            else:
                row["event_id"] = t.announce(target, result)
                row["status"] = "announced" if row["event_id"] else "error"
                if row["event_id"] is None:
                    row["error"] = "events are off in this process (is PREFECT_API_URL set?)"
        rows.append(row)
    table = [{key: row[key] for key in ("model", "status", "old_revision", "new_revision", "reason", "error")}
             for row in rows]
    create_table_artifact(table, key=ARTIFACT_KEY, description="watched models and their revisions")
    create_markdown_artifact(rows_markdown(rows), key=f"{ARTIFACT_KEY}-report", description="model revisions")
    failed = [row for row in rows if row["status"] == "error"]
    if failed:
        raise WatchFailed("could not check " + "; ".join(f"{row['model']}: {row['error']}" for row in failed), rows)
    logger.info("%d models watched, %d announced", len(rows), sum(row["status"] == "announced" for row in rows))
    return rows
