"""gc never deletes what it cannot account for, on both backends: unreadable records stop it, a location that is
not a store is refused, young blobs are kept, and the dry run lists everything --apply removes."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest

from tests.helpers.store import make_engine, new_manifest, read_tree, standard_files
from tests.store.conftest import incomplete_uploads, leave_incomplete_upload, make_store, put_raw, raw_keys
from vlmforge.errors import StoreError
from vlmforge.store import ArtifactStore
from vlmforge.store.base import STORE_MARKER, alias_key, blob_key, build_key

MODEL = "qwen2-vl-2b"


def _publish(store: ArtifactStore, tmp_path: Path, minutes: int, seed: str):  # type: ignore[no-untyped-def]
    engine = make_engine(tmp_path / f"engine-{seed}", standard_files(seed))
    return store.publish(engine, new_manifest(minutes=minutes, seed=seed)).manifest, engine


@pytest.mark.parametrize("damage", ["newer schema", "corrupt file"])
def test_gc_refuses_while_a_manifest_is_unreadable(store: ArtifactStore, store_url: str, tmp_path: Path,
                                                   damage: str) -> None:
    """It deleted every blob of a manifest it could not read, alias or not, while printing "left in place"."""
    old, engine = _publish(store, tmp_path, 0, "old")
    _publish(store, tmp_path, 1, "new")
    store.promote(f"{MODEL}#{old.build_id}", "stable")
    key = build_key(MODEL, old.build_id)
    original = store._get(key)[0]
    if damage == "newer schema":
        raw = json.loads(original)
        raw.update(schema_version=2, chunks={"layout": "v2"})
        put_raw(store_url, key, json.dumps(raw).encode())
    else:
        put_raw(store_url, key, original[:-40])  # a truncated file

    with pytest.raises(StoreError, match=r"gc refused on .*cannot be read.*--ignore-unreadable"):
        store.gc(1, apply=True)
    for entry in old.files:
        assert store._size(blob_key(entry.sha256)) == entry.size
    assert store._size(key) is not None
    dry = store.gc(1)
    assert dry.refused_manifests == [key] and "cannot be read" in (dry.refusal or "")
    assert key in dry.reasons and "refused manifest" in dry.reasons[key]

    # Told explicitly, gc collects, but still keeps every blob the unreadable manifest names.
    report = store.gc(1, apply=True, ignore_unreadable=True)
    assert report.applied and report.ignored_unreadable
    for entry in old.files:
        assert store._size(blob_key(entry.sha256)) == entry.size
    put_raw(store_url, key, original)  # repaired: the aliased build is whole
    store.pull(f"{MODEL}@stable", tmp_path / "stable")
    assert read_tree(tmp_path / "stable") == read_tree(engine)


def test_gc_refuses_while_an_alias_record_is_unreadable(store: ArtifactStore, store_url: str, tmp_path: Path) -> None:
    """An alias gc cannot read may pin any build: --apply refuses; with --ignore-unreadable the builds named in
    its bytes are kept."""
    old, _ = _publish(store, tmp_path, 0, "old")
    _publish(store, tmp_path, 1, "new")
    store.promote(f"{MODEL}#{old.build_id}", "stable")
    key = alias_key(MODEL, "stable")
    put_raw(store_url, key, store._get(key)[0][:-20])
    with pytest.raises(StoreError, match="gc refused"):
        store.gc(1, apply=True)
    report = store.gc(1, apply=True, ignore_unreadable=True)
    assert report.refused_aliases == [key] and report.deleted == []
    kept = {b.build_id: b.reasons for b in report.kept}
    assert kept[old.build_id] == ["named by an unreadable alias record"]
    store.pull(f"{MODEL}#{old.build_id}", tmp_path / "old")


def test_gc_pull_and_publish_refuse_a_location_that_is_not_a_store(store_url: str, tmp_path: Path) -> None:
    """gc --apply on a directory that was not a store emptied its tmp/ (the dry run said "0 builds, 0 blobs")."""
    foreign = {"tmp/work/notes.txt": b"mine", "tmp/cache.bin": b"x" * 100, "data.csv": b"a,b\n"}
    for key, data in foreign.items():
        put_raw(store_url, key, data)
    store = make_store(store_url)
    for action in (lambda: store.gc(1), lambda: store.gc(1, apply=True), lambda: store.pull(MODEL, tmp_path / "o")):
        with pytest.raises(StoreError, match=f"is not a vlmforge store .*no {STORE_MARKER}.* holds other data"):
            action()
    engine = make_engine(tmp_path / "engine", standard_files("x"))
    with pytest.raises(StoreError, match="refusing to publish .* point --store at a store, or at an empty location"):
        store.publish(engine, new_manifest())
    with pytest.raises(StoreError, match="cannot be adopted"):
        store.init(adopt=True)
    assert raw_keys(store_url) == set(foreign)  # nothing touched, nothing added


def test_first_publish_creates_the_store_and_old_stores_are_adopted(store_url: str, tmp_path: Path) -> None:
    store = make_store(store_url)
    assert store.store_info() is None
    with pytest.raises(StoreError, match="not a vlmforge store .*nothing was published there"):
        store.gc(1)
    manifest, engine = _publish(store, tmp_path, 0, "a")
    info = store.store_info()
    assert info is not None and not info.adopted and STORE_MARKER in raw_keys(store_url)
    assert store.init() == info  # idempotent

    # A store made before markers existed: refused with the fix named, adopted once, then used as before.
    other = make_store(store_url)
    other._delete(STORE_MARKER)
    with pytest.raises(StoreError, match="looks like a store made before .*store init --adopt"):
        other.publish(engine, new_manifest(minutes=1, seed="b"))
    with pytest.raises(StoreError, match="store init --adopt"):
        other.init()
    assert other.init(adopt=True).adopted
    assert other.gc(1, apply=True).applied
    other.pull(f"{MODEL}#{manifest.build_id}", tmp_path / "out")


def test_dry_run_lists_everything_apply_removes(store: ArtifactStore, store_url: str, tmp_path: Path) -> None:
    old, _ = _publish(store, tmp_path, 0, "old")
    _publish(store, tmp_path, 1, "new")
    leftover = leave_incomplete_upload(store_url, "ab" * 32)
    if not store_url.startswith("s3://"):  # the local scratch space: only the store's own files are removed
        put_raw(store_url, ".vlmforge-scratch/notes.txt", b"not ours")
    dry = store.gc(1)
    assert [b.build_id for b in dry.deleted] == [old.build_id]
    shared = {e.sha256 for e in _publish(store, tmp_path, 1, "new")[0].files}
    doomed = {e.sha256 for e in old.files} - shared
    assert {b.sha256 for b in dry.blobs} == doomed and dry.blobs_deleted == len(doomed)
    assert [i.key for i in dry.incomplete] == [leftover]
    before = raw_keys(store_url)

    applied = store.gc(1, apply=True)
    removed = before - raw_keys(store_url)
    scratch = set() if store_url.startswith("s3://") else {leftover}
    assert removed == {build_key(MODEL, old.build_id)} | {blob_key(sha) for sha in doomed} | scratch
    assert [i.key for i in applied.incomplete] == [leftover] and applied.incomplete_cleaned == 1
    assert incomplete_uploads(store_url) == ([] if store_url.startswith("s3://") else [".vlmforge-scratch/notes.txt"])


def test_young_blobs_and_leftovers_are_kept_for_the_grace_period(store_url: str, tmp_path: Path) -> None:
    """A blob just uploaded may be about to be referenced by a manifest: gc waits for the grace period."""
    store = make_store(store_url, gc_grace=timedelta(hours=1))
    old, _ = _publish(store, tmp_path, 0, "old")
    _publish(store, tmp_path, 1, "new")
    leftover = leave_incomplete_upload(store_url, "cd" * 32)
    report = store.gc(1, apply=True)
    assert [b.build_id for b in report.deleted] == [old.build_id]
    assert report.blobs_deleted == 0 and report.blobs_young == 2 and report.grace_seconds == 3600
    if not store_url.startswith("s3://"):  # moto reports every multipart upload as initiated in 2010
        assert report.incomplete == [] and incomplete_uploads(store_url) == [leftover]
    assert store.gc(1, apply=True, grace=timedelta(0)).blobs_deleted == 2
    assert incomplete_uploads(store_url) == []


def test_a_location_with_only_scratch_like_names_is_not_adopted(store_url: str) -> None:
    put_raw(store_url, "tmp/cache.bin", b"mine")
    with pytest.raises(StoreError, match="holds tmp/ but no blobs/ or models/: .*cannot be adopted"):
        make_store(store_url).init(adopt=True)
    assert raw_keys(store_url) == {"tmp/cache.bin"}
