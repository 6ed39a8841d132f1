"""The artifact store contract, run identically against the local and the S3 (moto) backends."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from tests.helpers.store import make_engine, new_manifest, payload, read_tree, standard_files
from tests.store.conftest import SETTINGS
from vlmforge.artifacts.manifest import FileEntry
from vlmforge.errors import IntegrityError, NotFound, StoreConflict, StoreError
from vlmforge.store import ArtifactStore, Ref, TransferSettings
from vlmforge.store.base import GC_LOCK, MARKER, WRITER_LOCKS, PreconditionFailed, alias_key, blob_key, build_key


def publish(store: ArtifactStore, tmp_path: Path, *, minutes: int = 0, seed: str = "a", model: str = "qwen2-vl-2b",
            files: dict[str, bytes] | None = None, aliases: tuple[str, ...] = ("latest",)):
    engine = make_engine(tmp_path / f"engine-{model}-{seed}-{minutes}", files or standard_files(seed))
    return store.publish(engine, new_manifest(model, minutes=minutes, seed=seed), aliases=aliases), engine


def test_publish_pull_roundtrip(store: ArtifactStore, tmp_path: Path) -> None:
    result, engine = publish(store, tmp_path)
    m = result.manifest
    assert result.created and result.uploaded_blobs == 5 and result.reused_blobs == 0
    assert [f.path for f in m.files] == sorted(read_tree(engine))
    assert result.aliases[0].moved and result.aliases[0].build_id == m.build_id
    assert m.build_id.startswith("20261126T050000Z-")

    dest = tmp_path / "pulled" / "engine"
    pulled = store.pull(m.model, dest)
    assert pulled == m
    assert read_tree(dest) == read_tree(engine)
    assert json.loads((dest / MARKER).read_text())["build_id"] == m.build_id
    assert not list(dest.parent.glob(".*partial*"))
    # Pulling the same build again is a no-op; another build into the same dir needs overwrite.
    assert store.pull(f"{m.model}#{m.build_id}", dest) == m
    assert store.resolve("qwen2-vl-2b@latest") == m == store.resolve(Ref(model="qwen2-vl-2b", build_id=m.build_id))


def test_republish_is_idempotent_and_noop(store: ArtifactStore, tmp_path: Path) -> None:
    first, engine = publish(store, tmp_path)
    again = store.publish(engine, first.manifest)
    assert not again.created and again.uploaded_blobs == 0 and again.manifest == first.manifest
    assert not again.aliases[0].moved
    # Precomputed file entries (hashed by the caller) are accepted and checked against the files on disk.
    rehash = store.publish(engine, new_manifest(minutes=1).with_files(first.manifest.files))
    assert rehash.created and rehash.uploaded_blobs == 0 and rehash.reused_blobs == 5


def test_same_build_id_different_fingerprint_conflicts(store: ArtifactStore, tmp_path: Path) -> None:
    first, _ = publish(store, tmp_path)
    other = make_engine(tmp_path / "other", {"x.engine": b"different"})
    clash = new_manifest(seed="other").model_copy(update={"build_id": first.manifest.build_id})
    with pytest.raises(StoreConflict, match="already exists in .* with another fingerprint"):
        store.publish(other, clash)
    assert store.resolve("qwen2-vl-2b") == first.manifest


def test_dedup_across_builds(store: ArtifactStore, tmp_path: Path) -> None:
    first, _ = publish(store, tmp_path, seed="a")
    files = standard_files("b")  # new rank engine + config, same visual engine and tokenizer
    files["copy/visual_encoder.engine"] = files["visual/visual_encoder.engine"]  # duplicate inside a build
    second, _ = publish(store, tmp_path, minutes=5, seed="b", files=files)
    assert second.uploaded_blobs == 2  # rank0.engine and config.json
    assert second.reused_blobs == 3  # visual engine, tokenizer, empty file
    assert second.uploaded_bytes == len(files["rank0.engine"]) + len(files["config.json"])
    blobs = list(store._list("blobs/"))
    assert len(blobs) == 7
    dest = tmp_path / "second"
    store.pull("qwen2-vl-2b", dest)
    assert read_tree(dest) == files
    assert first.manifest.build_id != second.manifest.build_id


def test_listing_and_refs(store: ArtifactStore, tmp_path: Path) -> None:
    old, _ = publish(store, tmp_path, minutes=0, seed="a")
    new, _ = publish(store, tmp_path, minutes=10, seed="b")
    publish(store, tmp_path, model="llava-1.5-7b", seed="c")
    assert [(m.model, m.builds) for m in store.list_models()] == [("llava-1.5-7b", 1), ("qwen2-vl-2b", 2)]
    builds = store.list_builds("qwen2-vl-2b")
    assert [b.build_id for b in builds] == [new.manifest.build_id, old.manifest.build_id]
    assert builds[0].aliases == ["latest"] and builds[1].aliases == []
    assert builds[0].compute_capability == "9.0" and builds[0].size == new.manifest.total_size
    assert len(store.list_builds()) == 3
    assert store.resolve("qwen2-vl-2b") == new.manifest
    assert store.resolve(f"qwen2-vl-2b#{old.manifest.build_id}") == old.manifest
    with pytest.raises(NotFound, match="has no alias 'stable'; aliases: latest"):
        store.resolve("qwen2-vl-2b@stable")
    with pytest.raises(NotFound, match="model 'nope' not found"):
        store.resolve("nope")
    with pytest.raises(NotFound, match="not found"):
        store.resolve("qwen2-vl-2b#20200101T000000Z-deadbeef")
    for bad in ("", "a/b", "../x", "m@", "m#", "m@a@b", "-x"):
        with pytest.raises(StoreError, match="bad reference"):
            store.resolve(bad)


def test_latest_only_moves_forward_and_promote(store: ArtifactStore, tmp_path: Path) -> None:
    new, _ = publish(store, tmp_path, minutes=10, seed="new")
    old, _ = publish(store, tmp_path, minutes=0, seed="old")  # an older build published later
    assert not old.aliases[0].moved and "newer" in old.aliases[0].note
    assert store.resolve("qwen2-vl-2b") == new.manifest
    move = store.promote(f"qwen2-vl-2b#{old.manifest.build_id}", "stable")
    assert move.moved and move.previous is None
    move = store.promote("qwen2-vl-2b@latest", "stable", expected=old.manifest.build_id)
    assert move.moved and move.previous == old.manifest.build_id
    record = store.get_alias("qwen2-vl-2b", "stable")
    assert record is not None and [e.build_id for e in record.history] == [new.manifest.build_id, old.manifest.build_id]
    with pytest.raises(StoreConflict, match=rf"stable conflict: expected it to point to {old.manifest.build_id}"):
        store.promote(f"qwen2-vl-2b#{old.manifest.build_id}", "stable", expected=old.manifest.build_id)
    # Explicit promotion may move an alias backwards.
    assert store.promote(f"qwen2-vl-2b#{old.manifest.build_id}", "latest").moved
    assert store.resolve("qwen2-vl-2b").build_id == old.manifest.build_id


def test_backend_conditional_writes_are_real_cas(store: ArtifactStore) -> None:
    """Two writers racing on create-if-absent and on replace-if-unchanged: exactly one wins each time."""
    key = "models/m/aliases/race.json"
    for round_ in range(3):
        _, version = store._get(key) if round_ else (None, None)
        barrier = threading.Barrier(2)
        outcomes: list[str] = []

        def write(name: str) -> None:
            barrier.wait()
            try:
                store._put(key, name.encode(), if_absent=version is None, if_version=version)
                outcomes.append("won")
            except PreconditionFailed:
                outcomes.append("lost")

        threads = [threading.Thread(target=write, args=(f"w{i}-{round_}",)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(outcomes) == ["lost", "won"]


def test_two_publishers_race_for_one_alias(store: ArtifactStore, tmp_path: Path) -> None:
    """Both read the alias as absent and write at once: one wins, the other gets a clear conflict and retries."""
    a, _ = publish(store, tmp_path, minutes=0, seed="a", aliases=())
    b, _ = publish(store, tmp_path, minutes=1, seed="b", aliases=())
    barrier = threading.Barrier(2)
    real_put = store._put

    def racing_put(key: str, data: bytes, **kwargs: object) -> None:
        if key == alias_key("qwen2-vl-2b", "latest"):
            barrier.wait(timeout=10)  # both have read "no alias" by now
        real_put(key, data, **kwargs)  # type: ignore[arg-type]

    store._put = racing_put  # type: ignore[method-assign]
    results: dict[str, object] = {}

    def set_latest(result: object) -> None:
        manifest = result.manifest  # type: ignore[attr-defined]
        try:
            results[manifest.build_id] = store.set_alias("qwen2-vl-2b", "latest", manifest.build_id, expected=None)
        except StoreConflict as exc:
            results[manifest.build_id] = exc

    threads = [threading.Thread(target=set_latest, args=(r,)) for r in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store._put = real_put  # type: ignore[method-assign]
    conflicts = [e for e in results.values() if isinstance(e, StoreConflict)]
    assert len(conflicts) == 1, results
    winner = next(bid for bid, r in results.items() if not isinstance(r, StoreConflict))
    loser = next(bid for bid, r in results.items() if isinstance(r, StoreConflict))
    message = str(conflicts[0])
    assert "qwen2-vl-2b@latest" in message and "(no alias yet)" in message and winner in message
    # The loser retries cleanly: latest ends on the newest build whoever won the race.
    store.move_alias(f"qwen2-vl-2b#{loser}", "latest")
    assert store.resolve("qwen2-vl-2b") == b.manifest


def test_concurrent_publishes_end_on_newest(store: ArtifactStore, tmp_path: Path) -> None:
    engines = [make_engine(tmp_path / f"e{i}", {"rank0.engine": payload(f"c{i}", 2000), "cfg": b"%d" % i})
               for i in range(4)]
    manifests = [new_manifest(minutes=i, seed=f"c{i}") for i in range(4)]
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            store.publish(engines[i], manifests[i], aliases=("latest", "nightly"))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert store.resolve("qwen2-vl-2b").build_id == manifests[-1].build_id
    assert store.resolve("qwen2-vl-2b@nightly").build_id == manifests[-1].build_id
    assert len(store.list_builds("qwen2-vl-2b")) == 4
    assert not list(store._list(WRITER_LOCKS))


def test_corrupted_blob_is_refused_on_pull(store: ArtifactStore, tmp_path: Path) -> None:
    result, engine = publish(store, tmp_path)
    for path in ("config.json", "rank0.engine"):  # single-part and multi-part blobs
        entry = next(f for f in result.manifest.files if f.path == path)
        good = (engine / path).read_bytes()
        bad = bytearray(good)
        bad[len(bad) // 2] ^= 0xFF
        store._put(blob_key(entry.sha256), bytes(bad))
        dest = tmp_path / f"pulled-{path}"
        with pytest.raises(IntegrityError, match=f"blob {entry.sha256[:12]} of {path}.*refusing corrupted data"):
            store.pull("qwen2-vl-2b", dest)
        assert not dest.exists()
        staging = dest.parent / f".{dest.name}.vlmforge-partial"
        assert not (staging / path).exists()
        store._put(blob_key(entry.sha256), good)
        store.pull("qwen2-vl-2b", dest)  # repaired store: the pull resumes and completes
        assert read_tree(dest) == read_tree(engine)


def test_missing_blob_is_reported(store: ArtifactStore, tmp_path: Path) -> None:
    result, _ = publish(store, tmp_path)
    entry = next(f for f in result.manifest.files if f.path == "config.json")
    store._delete(blob_key(entry.sha256))
    with pytest.raises(IntegrityError, match="missing"):
        store.pull("qwen2-vl-2b", tmp_path / "out")
    assert store.gc(5).missing_blobs == [entry.sha256]


@pytest.mark.parametrize(
    "bad_path",
    ["../evil", "/etc/evil", "a/../../evil", "a\\..\\evil", "a//b", "./a", "", ".vlmforge-manifest.json", "C:/evil"],
)
def test_manifest_with_path_traversal_is_rejected(store: ArtifactStore, tmp_path: Path, bad_path: str) -> None:
    result, _ = publish(store, tmp_path)
    raw = json.loads(result.manifest.to_json())
    raw["build_id"] = "20261126T060000Z-evil0000"
    raw["files"][0]["path"] = bad_path
    store._put(build_key("qwen2-vl-2b", raw["build_id"]), json.dumps(raw).encode())
    with pytest.raises(IntegrityError, match="refused manifest"):
        store.resolve(f"qwen2-vl-2b#{raw['build_id']}")
    work = tmp_path / "work"
    with pytest.raises(IntegrityError, match="refused manifest"):
        store.pull(f"qwen2-vl-2b#{raw['build_id']}", work / "out")
    assert not (tmp_path / "evil").exists() and not work.exists()
    # Listings skip the refused manifest; gc reports it, and --apply refuses while it is there.
    assert [b.build_id for b in store.list_builds("qwen2-vl-2b")] == [result.manifest.build_id]
    assert store.gc(1).refused_manifests == [build_key("qwen2-vl-2b", raw["build_id"])]
    with pytest.raises(StoreError, match="gc refused"):
        store.gc(1, apply=True)
    report = store.gc(1, apply=True, ignore_unreadable=True)
    assert report.refused_manifests == [build_key("qwen2-vl-2b", raw["build_id"])]
    assert store._size(build_key("qwen2-vl-2b", raw["build_id"])) is not None  # left in place


def test_pull_resumes_after_interruption(store: ArtifactStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result, engine = publish(store, tmp_path)
    store.settings = TransferSettings(**{**SETTINGS.model_dump(), "workers": 1})  # deterministic order
    fetched: list[str] = []
    real = store._schedule_download

    def failing(entry: FileEntry, dest: Path, group, sink, on_done):  # type: ignore[no-untyped-def]
        fetched.append(entry.path)

        def boom() -> None:
            raise OSError("injected failure while placing tokenizer.json")

        real(entry, dest, group, sink, boom if entry.path == "tokenizer/tokenizer.json" else on_done)

    monkeypatch.setattr(store, "_schedule_download", failing)
    dest = tmp_path / "out"
    with pytest.raises(OSError, match="injected"):
        store.pull("qwen2-vl-2b", dest)
    assert not dest.exists()
    staging = tmp_path / ".out.vlmforge-partial"
    assert (staging / "rank0.engine").is_file()
    fetched.clear()
    monkeypatch.setattr(store, "_schedule_download", lambda *a: (fetched.append(a[0].path), real(*a)))
    store.pull("qwen2-vl-2b", dest)
    assert "rank0.engine" not in fetched and "tokenizer/tokenizer.json" in fetched
    assert read_tree(dest) == read_tree(engine) and not staging.exists()


def test_pull_resumes_inside_a_big_file(store: ArtifactStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An interrupted multi-part download keeps its finished parts; the rerun fetches only the rest."""
    import vlmforge.store.transfer as transfer

    result, engine = publish(store, tmp_path, files={"rank0.engine": payload("big", 2 * 1024 * 1024 + 7)})
    store.settings = TransferSettings(**{**SETTINGS.model_dump(), "workers": 1, "attempts": 1})
    calls: list[int] = []
    real_init = transfer.RangedCopy.__init__

    def counting_init(self, dest, entry, fetch, *args, **kwargs):  # type: ignore[no-untyped-def]
        def wrapped(fd: int, offset: int, length: int, sink) -> None:  # type: ignore[no-untyped-def]
            calls.append(offset)
            if fail_at is not None and offset == fail_at:
                raise ConnectionResetError("injected reset")
            fetch(fd, offset, length, sink)

        real_init(self, dest, entry, wrapped, *args, **kwargs)

    monkeypatch.setattr(transfer.RangedCopy, "__init__", counting_init)
    part = SETTINGS.download_part_size
    fail_at: int | None = 5 * part
    with pytest.raises(Exception, match="injected reset"):
        store.pull("qwen2-vl-2b", tmp_path / "out")
    assert calls == [i * part for i in range(6)]
    calls.clear()
    fail_at = None
    store.pull("qwen2-vl-2b", tmp_path / "out")
    assert calls == [5 * part, 6 * part, 7 * part, 8 * part]
    assert read_tree(tmp_path / "out") == read_tree(engine)


def test_pull_refuses_to_clobber(store: ArtifactStore, tmp_path: Path) -> None:
    old, _ = publish(store, tmp_path, minutes=0, seed="a")
    new, engine = publish(store, tmp_path, minutes=1, seed="b")
    dest = tmp_path / "dest"
    store.pull(f"qwen2-vl-2b#{old.manifest.build_id}", dest)
    with pytest.raises(StoreError, match="already exists"):
        store.pull("qwen2-vl-2b", dest)
    store.pull("qwen2-vl-2b", dest, overwrite=True)
    assert read_tree(dest) == read_tree(engine)
    assert not [p for p in tmp_path.iterdir() if "vlmforge-old" in p.name]
    empty = tmp_path / "empty"
    empty.mkdir()
    store.pull("qwen2-vl-2b", empty)  # an empty directory is fine
    assert read_tree(empty) == read_tree(engine)


def test_gc_keeps_newest_and_alias_targets(store: ArtifactStore, tmp_path: Path) -> None:
    results = [publish(store, tmp_path, minutes=i, seed=f"g{i}")[0] for i in range(4)]
    ids = [r.manifest.build_id for r in results]
    store.promote(f"qwen2-vl-2b#{ids[0]}", "stable")
    other, _ = publish(store, tmp_path, model="llava-1.5-7b", seed="l")

    dry = store.gc(keep=2)
    assert not dry.applied
    assert [b.build_id for b in dry.deleted] == [ids[1]]
    assert {b.build_id: b.reasons for b in dry.kept}[ids[0]] == ["alias stable"]
    assert dry.blobs_deleted == 2 and dry.bytes_deleted > 1024 * 1024  # its rank0.engine and config.json
    assert store.resolve(f"qwen2-vl-2b#{ids[1]}")  # nothing deleted in a dry run

    report = store.gc(keep=2, apply=True)
    assert report.applied and [b.build_id for b in report.deleted] == [ids[1]]
    with pytest.raises(NotFound):
        store.resolve(f"qwen2-vl-2b#{ids[1]}")
    for ref in (f"qwen2-vl-2b#{ids[0]}", "qwen2-vl-2b", "qwen2-vl-2b@stable", "llava-1.5-7b"):
        store.pull(ref, tmp_path / "pulls" / ref.replace("#", "_"))  # every kept build is still complete
    assert store.gc(keep=2).deleted == []
    assert not list(store._list("locks/"))
    assert other.created


def test_gc_and_writers_exclude_each_other(store: ArtifactStore, tmp_path: Path) -> None:
    import os
    import socket
    from datetime import UTC, datetime

    publish(store, tmp_path)
    lock = {"kind": "writer", "purpose": "publish x", "host": socket.gethostname(), "pid": os.getpid(),
            "by": "someone", "created_at": datetime.now(UTC).isoformat()}
    store._put(f"{WRITER_LOCKS}live.json", json.dumps(lock).encode())
    with pytest.raises(StoreConflict, match="publish/alias operation"):
        store.gc(1, apply=True)
    assert store.gc(1).applied is False  # dry runs need no lock
    assert store._size(GC_LOCK) is None  # the refused gc released its lock
    # --break-locks never breaks the lock of a live holder (it did: the publisher then wrote a manifest whose
    # blobs gc had just deleted)
    with pytest.raises(StoreConflict, match="holders are alive"):
        store.gc(1, apply=True, break_locks=True)
    assert store._size(f"{WRITER_LOCKS}live.json") is not None
    store._delete(f"{WRITER_LOCKS}live.json")

    dead = {**lock, "pid": 2**22 + 12345}  # a publisher that was killed on this host
    store._put(f"{WRITER_LOCKS}dead.json", json.dumps(dead).encode())
    assert store.gc(1, apply=True).applied
    assert store._size(f"{WRITER_LOCKS}dead.json") is None

    store._put(GC_LOCK, json.dumps({**lock, "kind": "gc", "purpose": "gc"}).encode())
    with pytest.raises(StoreError, match="garbage collection is running"):
        publish(store, tmp_path, minutes=3, seed="blocked")
    with pytest.raises(StoreConflict, match="another gc is running"):
        store.gc(1, apply=True)
    store._delete(GC_LOCK)
    assert publish(store, tmp_path, minutes=3, seed="blocked")[0].created


def test_publish_rejects_bad_input(store: ArtifactStore, tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        store.publish(tmp_path / "missing", new_manifest())
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(StoreError, match="holds no files"):
        store.publish(empty, new_manifest())
    engine = make_engine(tmp_path / "e", {"a.bin": b"abc"})
    with pytest.raises(StoreError, match="invalid alias"):
        store.publish(engine, new_manifest(), aliases=("no/slashes",))
    wrong = new_manifest().with_files([FileEntry(path="a.bin", sha256="0" * 64, size=3)])
    with pytest.raises(IntegrityError, match="does not match|sha256"):
        store.publish(engine, wrong)
    assert store.list_builds() == [] and list(store._list("blobs/")) == []
    with pytest.raises(IntegrityError, match="missing from"):
        store.publish(engine, new_manifest().with_files([FileEntry(path="b.bin", sha256="0" * 64, size=3)]))


def test_file_changed_while_publishing_is_refused(store: ArtifactStore, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    first, _ = publish(store, tmp_path, files={"big.engine": payload("big", 600_000), "small.json": b"{}"})
    files = {"big.engine": payload("big", 600_000), "new.json": b'{"new": 1}'}
    engine = make_engine(tmp_path / "second", files)
    monkeypatch.setattr(os, "cpu_count", lambda: 1)  # one hashing lane: big.engine is hashed (and reused) first
    real = store._schedule_upload

    def builder_still_writing(source: Path, entry: FileEntry, *args, **kwargs):  # type: ignore[no-untyped-def]
        for name in ("big.engine", "new.json"):
            (engine / name).write_bytes((engine / name).read_bytes() + b"more")
        return real(source, entry, *args, **kwargs)

    monkeypatch.setattr(store, "_schedule_upload", builder_still_writing)
    new_sha = FileEntry(path="x", sha256=__import__("hashlib").sha256(files["new.json"]).hexdigest(), size=1).sha256
    with pytest.raises(IntegrityError, match="changed while being published"):
        store.publish(engine, new_manifest(minutes=1, seed="changing"))
    assert [b.build_id for b in store.list_builds()] == [first.manifest.build_id]
    assert store._size(blob_key(new_sha)) is None  # the blob with the wrong bytes was removed...
    store.pull("qwen2-vl-2b", tmp_path / "out")  # ...while the reused blob of the first build is intact
    monkeypatch.setattr(store, "_schedule_upload", real)
    assert store.publish(engine, new_manifest(minutes=1, seed="changing")).created


def test_republishing_a_stored_manifest_ignores_local_bytes(store: ArtifactStore, tmp_path: Path) -> None:
    """Re-asserting an existing build (e.g. found by fingerprint) uploads nothing and needs no matching files."""
    first, _ = publish(store, tmp_path, minutes=0, seed="a")
    rebuilt = make_engine(tmp_path / "rebuilt", {"rank0.engine": b"not byte-identical"})
    again = store.publish(rebuilt, first.manifest, aliases=("latest", "stable"))
    assert not again.created and again.uploaded_blobs == 0
    assert store.resolve("qwen2-vl-2b@stable") == first.manifest
