"""Transfer machinery: part planning, task groups, in-order hashing, directory hashing."""

from __future__ import annotations

import hashlib
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
