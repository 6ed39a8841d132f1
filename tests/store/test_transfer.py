"""Transfer machinery: part planning, task groups, in-order hashing, directory hashing."""

from __future__ import annotations

import hashlib
import os
import random
import threading
import time
from pathlib import Path

import pytest

from vlmforge.store.transfer import OrderedHasher, TaskGroup, TransferSettings, hash_tree, plan_parts

MiB = 1024 * 1024


def test_plan_parts() -> None:
    s = TransferSettings(part_size=8 * MiB, min_part_size=5 * MiB, max_parts=10)
    assert plan_parts(0, s) == [(0, 0)]
    assert plan_parts(3, s) == [(0, 3)]
    assert plan_parts(16 * MiB, s) == [(0, 8 * MiB), (8 * MiB, 8 * MiB)]
    assert plan_parts(16 * MiB + 1, s)[-1] == (16 * MiB, 1)
    big = plan_parts(1000 * MiB, s)  # part count limit forces bigger parts
    assert len(big) == 10 and sum(length for _, length in big) == 1000 * MiB
    assert plan_parts(20 * MiB, TransferSettings(part_size=1 * MiB, min_part_size=5 * MiB))[0] == (0, 5 * MiB)


def test_task_group_runs_nested_tasks_and_reports_first_error() -> None:
    done: list[int] = []
    lock = threading.Lock()

    def leaf(i: int) -> None:
        with lock:
            done.append(i)

    def parent(group: TaskGroup, base: int) -> None:
        for i in range(5):
            group.submit(leaf, base + i)

    with TaskGroup(3) as group:
        for b in range(0, 50, 5):
            group.submit(parent, group, b)
        group.wait()
    assert sorted(done) == list(range(50))

    ran: list[int] = []

    def slow(i: int) -> None:
        time.sleep(0.01)
        ran.append(i)

    def fail() -> None:
        raise ValueError("boom")

    with TaskGroup(1) as group:
        group.submit(fail)
        for i in range(100):
            group.submit(slow, i)
        with pytest.raises(ValueError, match="boom"):
            group.wait()
        assert group.failed
    assert len(ran) < 100  # queued work was cancelled


def test_ordered_hasher_out_of_order(tmp_path: Path) -> None:
    data = random.Random(1).randbytes(1_000_003)
    path = tmp_path / "f"
    path.write_bytes(data)
    parts = plan_parts(len(data), TransferSettings(part_size=100_000, min_part_size=1))
    hasher = OrderedHasher(path, parts, chunk=4096)
    order = list(range(len(parts)))
    random.Random(2).shuffle(order)
    threads = [threading.Thread(target=hasher.mark_done, args=(i,)) for i in order]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert hasher.hexdigest() == hashlib.sha256(data).hexdigest()


def test_hash_tree_skips_reserved_names(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.bin").write_bytes(b"a")
    (tmp_path / "b.json").write_bytes(b"bb")
    (tmp_path / ".vlmforge-manifest.json").write_text("{}")
    (tmp_path / "link").symlink_to(tmp_path / "b.json")
    entries = hash_tree(tmp_path, TransferSettings(workers=2))
    assert [(e.path, e.size) for e in entries] == [("b.json", 2), ("link", 2), ("sub/a.bin", 1)]
    assert entries[0].sha256 == hashlib.sha256(b"bb").hexdigest()


def test_download_range_size() -> None:
    from vlmforge.store.transfer import download_range_size

    s = TransferSettings(workers=10, download_part_size=32 * MiB, max_download_part_size=256 * MiB)
    assert download_range_size(10 * MiB, s) == 32 * MiB  # small blob: one range
    assert download_range_size(768 * MiB, s) == -(-768 * MiB // 10)  # about one range per worker
    assert download_range_size(100 * 1024 * MiB, s) == 256 * MiB  # huge blob: capped for resume granularity


class _Ordered:
    """A stand-in TaskGroup that runs the submitted tasks in a chosen order (the resumed parts' hashing last)."""

    failed = False

    def __init__(self) -> None:
        self.tasks: list[tuple] = []

    def submit(self, fn, /, *args) -> None:  # type: ignore[no-untyped-def]
        self.tasks.append((fn, args))

    def run(self, order: list[int]) -> None:
        for i in order:
            fn, args = self.tasks[i]
            fn(*args)


@pytest.mark.parametrize("resume_last", [True, False])
def test_a_resumed_copy_finishes_once_whichever_task_ends_last(tmp_path: Path, resume_last: bool) -> None:
    """Two of three parts are in the part log from an interrupted copy: the copy is verified and done exactly once,
    whether the resumed parts are hashed before or after the missing part arrives."""
    from vlmforge.artifacts.manifest import FileEntry
    from vlmforge.store.transfer import RangedCopy

    settings = TransferSettings(download_part_size=1 * MiB, max_download_part_size=1 * MiB, min_part_size=1,
                                io_chunk=64 * 1024, workers=4)
    data = random.Random(3).randbytes(3 * MiB)
    entry = FileEntry(path="blob", sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    dest = tmp_path / "blob"
    finished: list[bool] = []

    def fetch(fd: int, offset: int, length: int, sink) -> None:  # type: ignore[no-untyped-def]
        os.pwrite(fd, data[offset:offset + length], offset)
        sink.advance(length)

    def copy() -> RangedCopy:
        return RangedCopy(dest, entry, fetch, settings, what="blob", on_done=lambda: finished.append(True),
                          retryable=lambda exc: False)

    class Sink:
        def advance(self, nbytes: int) -> None:
            pass

    first, group = copy(), _Ordered()  # the interrupted copy: parts 0 and 1 arrive, part 2 never does
    first.schedule(group, Sink())
    group.run([1, 2])  # task 0 hashes the (no) resumed parts, tasks 1..3 fetch parts 0..2
    assert not finished
    second, group = copy(), _Ordered()
    second.schedule(group, Sink())
    assert len(group.tasks) == 2  # the resumed parts' hashing, and the one missing part
    group.run([1, 0] if resume_last else [0, 1])
    assert finished == [True]
    assert dest.read_bytes() == data
