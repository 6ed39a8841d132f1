"""Tune artifacts in the store (both backends): stored beside a build without touching it, verified on read, kept
and dropped by gc with their builds."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.store import make_engine, new_manifest, payload, standard_files
from vlmforge.errors import IntegrityError
from vlmforge.store import ArtifactStore
from vlmforge.store.base import blob_key, build_key
from vlmforge.store.tune import TuneKey, newest_matching


def _publish(store: ArtifactStore, tmp_path: Path, *, minutes: int = 0, seed: str = "a"):
    engine = make_engine(tmp_path / f"engine-{seed}-{minutes}", standard_files(seed, big=4096))
    return store.publish(engine, new_manifest(minutes=minutes, seed=seed)).manifest


def _key(fingerprint: str, **changes: object) -> TuneKey:
    fields = {"fingerprint": fingerprint, "device": "NVIDIA H200", "capability": "9.0", "torch": "2.11.0",
              "triton": "3.5.0", "compile_mode": "max-autotune-no-cudagraphs", "buckets": ((1, 512), (16, 512))}
    return TuneKey.model_validate({**fields, **changes})


def test_a_tune_artifact_is_stored_beside_its_build_and_read_back_verified(store: ArtifactStore,
                                                                          tmp_path: Path) -> None:
    manifest = _publish(store, tmp_path)
    stored_manifest = store._get(build_key(manifest.model, manifest.build_id))[0]
    data = payload("artifacts", 70_000)
    record = store.publish_tune(manifest.ref, _key(manifest.fingerprint), data, warmup_seconds=12.5,
                                artifacts={"inductor": 2})
    assert (record.model, record.build_id, record.size) == (manifest.model, manifest.build_id, len(data))
    assert store.tune_records("qwen2-vl-2b") == [record]
    assert store.read_tune(record) == data
    # the build is what it was: same manifest bytes, same fingerprint, nothing new in its file list
    assert store._get(build_key(manifest.model, manifest.build_id))[0] == stored_manifest
    assert store.resolve("qwen2-vl-2b") == manifest
    # a second tune of the same key replaces the record; another key adds one
    again = store.publish_tune(manifest, _key(manifest.fingerprint), data[::-1], warmup_seconds=3)
    other = store.publish_tune(manifest, _key(manifest.fingerprint, torch="2.13.0"), data, warmup_seconds=3)
    assert {r.sha256 for r in store.tune_records(manifest)} == {again.sha256, other.sha256}


def test_a_damaged_tune_blob_is_refused(store: ArtifactStore, tmp_path: Path) -> None:
    manifest = _publish(store, tmp_path)
    data = payload("artifacts", 50_000)
    record = store.publish_tune(manifest, _key(manifest.fingerprint), data, warmup_seconds=1)
    store._put(blob_key(record.sha256), b"\0" * len(data))  # same size, other bytes
    with pytest.raises(IntegrityError, match="sha256|expected"):
        store.read_tune(record)


def test_a_tune_key_must_name_the_builds_fingerprint(store: ArtifactStore, tmp_path: Path) -> None:
    manifest = _publish(store, tmp_path)
    with pytest.raises(IntegrityError, match="fingerprint"):
        store.publish_tune(manifest, _key("0" * 64), b"x", warmup_seconds=1)


def test_gc_keeps_the_tune_artifacts_of_kept_builds_and_drops_the_others(store: ArtifactStore,
                                                                        tmp_path: Path) -> None:
    old, new = _publish(store, tmp_path, minutes=0, seed="o"), _publish(store, tmp_path, minutes=1, seed="n")
    kept = store.publish_tune(new, _key(new.fingerprint), payload("new", 9000), warmup_seconds=1)
    dropped = store.publish_tune(old, _key(old.fingerprint), payload("old", 9000), warmup_seconds=1)
    dry = store.gc(keep=1)
    assert len(dry.tune_records) == 1 and old.build_id in dry.tune_records[0]
    assert dropped.sha256 in {b.sha256 for b in dry.blobs} and kept.sha256 not in {b.sha256 for b in dry.blobs}
    store.gc(keep=1, apply=True)
    assert store.read_tune(kept) == payload("new", 9000)
    assert store._size(blob_key(dropped.sha256)) is None
    assert not list(store._list(f"models/{old.model}/tune/{old.build_id}/"))


def test_the_closest_record_names_what_differs() -> None:
    fingerprint = "a" * 64
    here = _key(fingerprint, buckets=((1, 512),))
    from datetime import UTC, datetime

    from vlmforge.store.tune import TuneRecord

    def record(key: TuneKey) -> TuneRecord:
        return TuneRecord(model="m", build_id="b", key=key, sha256="b" * 64, size=1,
                          created_at=datetime.now(UTC), by="t", warmup_seconds=1)

    found, why = newest_matching([record(_key(fingerprint, torch="2.13.0", triton=None))], here)
    assert found is None and why == ["torch: 2.11.0 here, 2.13.0 in the artifact",
                                     "triton: 3.5.0 here, None in the artifact"]
    found, why = newest_matching([record(_key(fingerprint, buckets=((1, 256),))), record(_key(fingerprint))], here)
    assert found is not None and why == []  # more compiled buckets than needed still fit
    assert newest_matching([], here) == (None, [])
