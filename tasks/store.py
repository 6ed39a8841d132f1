"""Prefect tasks over the artifact store (vlmforge.store)."""

from __future__ import annotations

from datetime import timedelta

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from vlmforge_tasks.common import retry_transient
from vlmforge.store import GcReport, open_store


@task(name="gc-store", retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=retry_transient,
      cache_policy=NONE, persist_result=False)
def gc(store_url: str | None, keep: int, apply: bool, break_locks: bool = False, grace_minutes: float = 60.0,
       ignore_unreadable: bool = False) -> GcReport:
    """The store's gc: a dry run reports, ``apply`` deletes (under the store's gc lock; refused while records
    are unreadable unless ``ignore_unreadable``)."""
    with open_store(store_url) as store:
        report = store.gc(keep, apply=apply, break_locks=break_locks, grace=timedelta(minutes=grace_minutes),
                          ignore_unreadable=ignore_unreadable)
    get_run_logger().info("%s %d builds and %d blobs (%d bytes); keeping %d builds", "deleted" if report.applied
                          else "would delete", len(report.deleted), report.blobs_deleted, report.bytes_deleted,
                          len(report.kept))
    return report
