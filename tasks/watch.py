"""Prefect tasks of the watch flow: list the watched models, check one revision, announce a change."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from vlmforge.build.watch import (
    EVENT,
    RevisionCheck,
    WatchTarget,
    check_target,
    event_payload,
    event_resource,
    watch_targets,
)
from vlmforge.store import open_store

PLAIN = {"cache_policy": NONE, "persist_result": False}


@task(name="list-watched-models", **PLAIN)
def list_targets(models: list[str] | None, store_url: str | None) -> list[WatchTarget]:
    with open_store(store_url) as store:
        targets = watch_targets(store, models)
    logger = get_run_logger()
    for target in targets:
        if target.error:
            logger.error("%s: %s", target.entry, target.error)
        else:
            logger.info("watching %s (spec from %s, source %s)", target.model, target.origin, target.spec["source"])
    return targets


@task(name="check-revision", task_run_name="check-{target.model}", **PLAIN)
def check_revision(target: WatchTarget, store_url: str | None) -> RevisionCheck:
    """The source's revision now against the model's newest published build."""
    with open_store(store_url) as store:
        result = check_target(target, store)
    logger = get_run_logger()
    if result.error:
        logger.error("%s: %s", result.model, result.error)
    else:
        logger.info("%s: %s -> %s: %s", result.model, result.old_revision, result.new_revision, result.reason)
    return result


@task(name="previous-announcement", task_run_name="previous-announcement-{model}", **PLAIN)
def previous_announcement(model: str, revision: str, within_hours: float) -> dict[str, Any] | None:
    """The newest ``vlmforge.model.updated`` event of the last ``within_hours`` that announced ``revision``."""
    if within_hours <= 0:
        return None
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter, EventResourceFilter

    now = datetime.now(UTC)
    query = EventFilter(occurred=EventOccurredFilter(since=now - timedelta(hours=within_hours), until=now),
                        event=EventNameFilter(name=[EVENT]),
                        resource=EventResourceFilter(id=[event_resource(model)["prefect.resource.id"]]))
    with get_client(sync_client=True) as client:
        page = client.read_events(filter=query, limit=50)
    for event in page.events:  # newest first
        if event.payload.get("new_revision") == revision:
            return {"event_id": str(event.id), "occurred": event.occurred.isoformat()}
    return None


@task(name="announce-update", task_run_name="announce-{result.model}", **PLAIN)
def announce(target: WatchTarget, result: RevisionCheck) -> str | None:
    """Emit ``vlmforge.model.updated`` for the model; the event's id, or None if events are off here."""
    from prefect.events import emit_event

    event = emit_event(event=EVENT, resource=event_resource(result.model), payload=event_payload(target, result))
    logger = get_run_logger()
    if event is None:
        logger.error("%s: events are off in this process: nothing announced", result.model)
        return None
    logger.info("announced %s %s -> %s (event %s)", result.model, result.old_revision, result.new_revision, event.id)
    return str(event.id)
