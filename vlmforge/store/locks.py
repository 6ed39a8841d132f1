"""Locks between writers (publish, alias moves) and gc, with leases renewed by a heartbeat.

Writers and gc exclude each other with a Dekker-style protocol on strongly consistent storage: each side first
writes its own lock, then looks for the other side's; at least one of two racing parties sees the other and backs
off. A lock is broken only when its holder is provably dead: on its own host (same boot, same pid namespace) when
the recorded process (pid and start time, :mod:`vlmforge.system.processes`) no longer runs; elsewhere when its
lease ran out (the holder renews it every third of ``lock_lease`` while it works). Locks written before leases
existed fall back to their age (``lock_ttl``).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Literal

from pydantic import ValidationError

from vlmforge.errors import NotFound, StoreConflict, StoreError
from vlmforge.store.backend import PreconditionFailed, StoreBackend
from vlmforge.store.keys import GC_LOCK, WRITER_LOCKS, actor, utcnow
from vlmforge.store.records import LockInfo
from vlmforge.system.processes import ProcessIdentity, same_process, start_time

logger = logging.getLogger(__name__)

_BOOT_ID = "/proc/sys/kernel/random/boot_id"
LEASE_SKEW = timedelta(seconds=60)
"""Clock difference between hosts tolerated before an expired lease counts: a lease is over only this much later."""


def _read_text(path: str) -> str | None:
    try:
        return Path(path).read_text().strip() or None
    except OSError:
        return None


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def new_lock(kind: Literal["writer", "gc"], purpose: str, lease: timedelta) -> LockInfo:
    """A lock record for this process, its lease running ``lease`` from now."""
    now = utcnow()
    return LockInfo(
        kind=kind, purpose=purpose, host=socket.gethostname(), pid=os.getpid(), by=actor(), created_at=now,
        start_time=start_time(os.getpid()), boot_id=_read_text(_BOOT_ID),
        pid_namespace=_pid_namespace(), lease_expires=now + lease, token=uuid.uuid4().hex,
    )


def holder_dead(info: LockInfo, *, now: datetime, lock_ttl: timedelta) -> str | None:
    """Why the holder of ``info`` is provably dead, or None if it may be alive.

    The holder's process can be checked only from the same kernel (same boot id, which is random per boot, so
    two machines that share a host name are told apart) and the same pid namespace; then its pid and start time
    decide. Otherwise only its lease can: it is over once expired by more than ``LEASE_SKEW``. A lock without a
    boot id (written before leases, or where /proc is absent) is checked locally when its host name is ours.
    """
    if info.boot_id is not None:
        local = info.boot_id == _read_text(_BOOT_ID) and info.pid_namespace == _pid_namespace()
    else:
        local = info.host == socket.gethostname() and info.pid_namespace in (None, _pid_namespace())
    if local:
        if not same_process(ProcessIdentity(pid=info.pid, start_time=info.start_time)):
            return f"process {info.pid} no longer runs on {info.host}"
        return None  # alive here, whatever its lease says
    if info.lease_expires is not None:
        if now > info.lease_expires + LEASE_SKEW:
            return f"its lease expired at {info.lease_expires:%Y-%m-%d %H:%M:%S}Z and was not renewed"
        return None
    if now - info.created_at > lock_ttl:
        return f"it has no lease and is older than {lock_ttl}"
    return None


def describe(info: LockInfo) -> str:
    """Who holds a lock, for messages."""
    return f"{info.purpose} by {info.by}, pid {info.pid}, since {info.created_at:%Y-%m-%d %H:%M:%S}Z"


class Lease:
    """A lock object we hold, kept alive by a heartbeat thread that renews its lease by compare-and-swap.

    If the object disappears or is replaced (a gc decided we were dead), or cannot be renewed before the lease
    runs out, the lease is *lost*: :meth:`check` then raises, so the holder stops before it writes anything that
    relies on the lock.
    """

    def __init__(self, store: StoreBackend, key: str, info: LockInfo, lease: timedelta) -> None:
        self._store = store
        self.key = key
        self.info = info
        self._lease = lease
        self._lost: str | None = None
        self._stop = threading.Event()
        self._renewing = threading.Lock()
        self._thread = threading.Thread(target=self._beat, name=f"vlmforge-lease-{info.kind}", daemon=True)

    def start(self) -> Lease:
        """Start the heartbeat."""
        self._thread.start()
        return self

    def check(self) -> None:
        """Renew the lease now, and raise StoreError if the lock was lost (broken by another party, or not renewed
        in time): called right before a write that relies on the lock."""
        if self._lost is None:
            self.renew()
        if self._lost is not None:
            raise StoreError(
                f"lost the {self.info.kind} lock {self.key} on {self._store.url} ({self._lost}); nothing more was"
                " written: retry"
            )

    def renew(self) -> None:
        """Extend the lease now (the heartbeat calls this); marks the lease lost if the lock is no longer ours."""
        with self._renewing:  # the heartbeat and check() must not race each other's compare-and-swap
            self._renew()

    def _renew(self) -> None:
        try:
            data, version = self._store._get(self.key)
        except NotFound:
            self._lost = "its lock object was removed"
            return
        try:
            current = LockInfo.model_validate_json(data)
        except ValidationError:
            current = None
        if current is None or current.token != self.info.token:
            self._lost = "its lock object now belongs to another holder"
            return
        renewed = self.info.model_copy(update={"lease_expires": utcnow() + self._lease})
        try:
            self._store._put(self.key, renewed.model_dump_json().encode(), if_version=version)
        except PreconditionFailed:
            self._lost = "its lock object changed while being renewed"
            return
        self.info = renewed

    def _beat(self) -> None:
        period = max(self._lease.total_seconds() / 3, 0.05)
        while not self._stop.wait(period) and self._lost is None:
            try:
                self.renew()
            except Exception as exc:  # noqa: BLE001 - a failed renewal is retried; the lease decides
                logger.warning("could not renew lock %s on %s: %s", self.key, self._store.url, exc)
                if self.info.lease_expires is not None and utcnow() > self.info.lease_expires:
                    self._lost = f"its lease could not be renewed ({exc})"

    def release(self) -> None:
        """Stop the heartbeat and delete the lock object if it is still ours."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        try:
            data, _ = self._store._get(self.key)
            current = LockInfo.model_validate_json(data)
        except (NotFound, ValidationError):
            return
        if current.token == self.info.token:
            self._store._delete(self.key)


class StoreLocks(StoreBackend):
    """Writer locks and the gc lock of one store."""

    def _read_lock(self, key: str) -> LockInfo | None:
        """The lock at ``key``; an unreadable one counts as held since its object's modification time."""
        try:
            data, _ = self._get(key)
        except NotFound:
            return None
        try:
            return LockInfo.model_validate_json(data)
        except ValidationError:
            parent = key.rsplit("/", 1)[0] + "/"
            modified = next((o.modified for o in self._list(parent) if o.key == key), utcnow())
            return LockInfo(kind="gc" if key == GC_LOCK else "writer", purpose="unreadable lock", host="?", pid=0,
                            by="?", created_at=modified)

    def _dead(self, info: LockInfo) -> str | None:
        return holder_dead(info, now=utcnow(), lock_ttl=self.lock_ttl)

    @contextmanager
    def _writer_lock(self, purpose: str) -> Iterator[Lease]:
        """Hold a writer lock (waiting up to ``lock_wait`` for a running gc); yields its lease."""
        key = f"{WRITER_LOCKS}{uuid.uuid4().hex}.json"
        deadline = time.monotonic() + self.lock_wait
        while True:
            info = new_lock("writer", purpose, self.lock_lease)
            self._put(key, info.model_dump_json().encode(), if_absent=True)
            holder = self._read_lock(GC_LOCK)
            if holder is None or self._dead(holder):
                break
            self._delete(key)
            if time.monotonic() > deadline:
                raise StoreError(f"garbage collection is running on {self.url} ({describe(holder)}); retry when"
                                 " it is done")
            logger.info("waiting for gc by %s to finish before %s", holder.by, purpose)
            time.sleep(1.0)
        lease = Lease(self, key, info, self.lock_lease).start()
        try:
            yield lease
        finally:
            lease.release()

    @contextmanager
    def _gc_lock(self) -> Iterator[tuple[Lease, list[str]]]:
        """Hold the gc lock with no live writer; yields its lease and the dead holders' locks it broke."""
        info = new_lock("gc", "gc", self.lock_lease)
        data = info.model_dump_json().encode()
        broken: list[str] = []
        try:
            self._put(GC_LOCK, data, if_absent=True)
        except PreconditionFailed:
            holder = self._read_lock(GC_LOCK)
            why = self._dead(holder) if holder is not None else "it vanished"
            if holder is not None and why is None:
                raise StoreConflict(f"another gc is running on {self.url} ({describe(holder)})") from None
            logger.warning("breaking the gc lock of %s: %s", holder.by if holder else "?", why)
            broken.append(f"{GC_LOCK} ({why})")
            self._delete(GC_LOCK)
            try:
                self._put(GC_LOCK, data, if_absent=True)
            except PreconditionFailed:
                raise StoreConflict(f"another gc just started on {self.url}") from None
        lease = Lease(self, GC_LOCK, info, self.lock_lease).start()
        try:
            active = []
            for obj in self._list(WRITER_LOCKS):
                writer = self._read_lock(obj.key)
                if writer is None:
                    continue
                why = self._dead(writer)
                if why is None:
                    active.append(writer)
                    continue
                logger.warning("removing the lock %s of a dead writer (%s): %s", obj.key, describe(writer), why)
                self._delete(obj.key)
                broken.append(f"{obj.key} ({describe(writer)}: {why})")
            if active:
                raise StoreConflict(
                    f"{len(active)} publish/alias operation(s) in progress on {self.url} (e.g. {describe(active[0])});"
                    " their holders are alive, so their locks are not broken: retry gc when they are done"
                )
            yield lease, broken
        finally:
            lease.release()
