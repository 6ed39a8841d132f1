"""Locks between publishers and gc, on both backends: only provably dead holders lose their lock (same host: pid
and start time; other hosts: an expired lease), a long publish renews its lease, and a publisher whose lock or
blobs vanished writes no manifest."""

from __future__ import annotations

import json
import os
import socket
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.store import make_engine, new_manifest, standard_files
from tests.store.conftest import make_store, put_raw
from vlmforge.errors import IntegrityError, StoreConflict, StoreError
from vlmforge.store import ArtifactStore
from vlmforge.store.base import WRITER_LOCKS, LockInfo, blob_key
from vlmforge.system.processes import start_time

MODEL = "qwen2-vl-2b"


def _lock(**fields: Any) -> bytes:
    now = datetime.now(UTC)
    record = {"kind": "writer", "purpose": "publish m#1", "host": socket.gethostname(), "pid": os.getpid(),
              "by": "ci@builder", "created_at": (now - timedelta(hours=3)).isoformat(), **fields}
    return json.dumps(record, default=str).encode()


def _published(store: ArtifactStore, tmp_path: Path) -> None:
    store.publish(make_engine(tmp_path / "e", standard_files("a")), new_manifest())


def test_locks_of_other_hosts_are_broken_only_when_their_lease_expired(store: ArtifactStore, store_url: str,
                                                                        tmp_path: Path) -> None:
    _published(store, tmp_path)
    soon = datetime.now(UTC) + timedelta(minutes=1)
    put_raw(store_url, f"{WRITER_LOCKS}remote.json", _lock(host="builder-7", pid=4242, lease_expires=soon))
    for break_locks in (False, True):
        with pytest.raises(StoreConflict, match="holders are alive"):
            store.gc(1, apply=True, break_locks=break_locks)
    assert store._size(f"{WRITER_LOCKS}remote.json") is not None

    expired = datetime.now(UTC) - timedelta(minutes=10)
    put_raw(store_url, f"{WRITER_LOCKS}remote.json", _lock(host="builder-7", pid=4242, lease_expires=expired))
    report = store.gc(1, apply=True)
    assert len(report.broken_locks) == 1 and "lease expired" in report.broken_locks[0]
    assert store._size(f"{WRITER_LOCKS}remote.json") is None


def test_a_recycled_pid_is_not_the_lock_holder(store: ArtifactStore, store_url: str, tmp_path: Path) -> None:
    """Same host: the pid alone is not enough, its start time must match too (pids are reused)."""
    _published(store, tmp_path)
    mine = start_time(os.getpid())
    assert mine is not None
    put_raw(store_url, f"{WRITER_LOCKS}live.json", _lock(start_time=mine))
    with pytest.raises(StoreConflict, match="holders are alive"):
        store.gc(1, apply=True, break_locks=True)
    put_raw(store_url, f"{WRITER_LOCKS}live.json", _lock(start_time=mine - 1))  # an earlier process with our pid
    report = store.gc(1, apply=True)
    assert "no longer runs" in report.broken_locks[0] and store._size(f"{WRITER_LOCKS}live.json") is None


def test_a_long_publish_renews_its_lease(store_url: str, tmp_path: Path) -> None:
    store = make_store(store_url, lock_lease=timedelta(seconds=0.6))
    leases: list[datetime] = []
    real = store._schedule_upload

    def slow(*args: Any, **kwargs: Any) -> Any:
        if not leases:
            for _ in range(3):
                [lock] = list(store._list(WRITER_LOCKS))
                leases.append(LockInfo.model_validate_json(store._get(lock.key)[0]).lease_expires)  # type: ignore[arg-type]
                time.sleep(0.4)
        return real(*args, **kwargs)

    store._schedule_upload = slow  # type: ignore[method-assign]
    result = store.publish(make_engine(tmp_path / "e", standard_files("a")), new_manifest())
    assert result.created
    assert leases == sorted(leases) and leases[-1] > leases[0]  # renewed while the publish ran
    assert list(store._list(WRITER_LOCKS)) == []


def test_a_publisher_that_lost_its_lock_writes_no_manifest(store_url: str, tmp_path: Path) -> None:
    store = make_store(store_url, lock_lease=timedelta(seconds=0.3))
    real = store._hash_and_upload

    def lock_broken_meanwhile(*args: Any, **kwargs: Any) -> Any:
        out = real(*args, **kwargs)
        for lock in list(store._list(WRITER_LOCKS)):
            store._delete(lock.key)  # what a gc that wrongly judged us dead would do
        time.sleep(0.5)  # the heartbeat notices
        return out

    store._hash_and_upload = lock_broken_meanwhile  # type: ignore[method-assign]
    with pytest.raises(StoreError, match="lost the writer lock .*nothing more was written"):
        store.publish(make_engine(tmp_path / "e", standard_files("a")), new_manifest())
    assert store.list_builds() == []


def test_publish_checks_every_blob_right_before_writing_the_manifest(store: ArtifactStore, tmp_path: Path) -> None:
    """A gc that deleted blobs under a running publisher made it write a manifest whose blobs were gone."""
    engine = make_engine(tmp_path / "e", standard_files("a"))
    real = store._hash_and_upload
    victims: list[str] = []

    def gc_meanwhile(*args: Any, **kwargs: Any) -> Any:
        files, stats, hashed = real(*args, **kwargs)
        victim = next(f for f in files if f.path == "config.json")
        store._delete(blob_key(victim.sha256))
        victims.append(victim.path)
        return files, stats, hashed

    store._hash_and_upload = gc_meanwhile  # type: ignore[method-assign]
    with pytest.raises(IntegrityError, match=r"1 blob\(s\) of .* missing .* right before its manifest"):
        store.publish(engine, new_manifest())
    assert victims == ["config.json"] and store.list_builds() == []
    store._hash_and_upload = real  # type: ignore[method-assign]
    assert store.publish(engine, new_manifest()).created  # the rerun uploads it again
    store.pull(MODEL, tmp_path / "out")


def test_a_namesake_host_is_not_this_host(store: ArtifactStore, store_url: str, tmp_path: Path) -> None:
    """Another machine with our host name (another boot id): its process cannot be checked here, its lease rules."""
    from vlmforge.store.locks import new_lock

    _published(store, tmp_path)
    mine = new_lock("writer", "publish m#1", timedelta(minutes=2))
    assert mine.boot_id is not None
    namesake = mine.model_copy(update={"boot_id": "0" * 8 + mine.boot_id[8:], "pid": 2**22 + 77})
    put_raw(store_url, f"{WRITER_LOCKS}namesake.json", namesake.model_dump_json().encode())
    with pytest.raises(StoreConflict, match="holders are alive"):
        store.gc(1, apply=True)
    dead_here = mine.model_copy(update={"pid": 2**22 + 77})  # this machine, a process that is gone
    put_raw(store_url, f"{WRITER_LOCKS}namesake.json", dead_here.model_dump_json().encode())
    assert "no longer runs" in store.gc(1, apply=True).broken_locks[0]
