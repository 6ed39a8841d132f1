"""Same-second publishes of one fingerprint are idempotent, and alias records are validated like manifests (a bad
one is reported and skipped, never joined into a path), on both backends."""

from __future__ import annotations

import json
import logging
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.helpers.store import make_engine, new_manifest, payload, standard_files
from tests.store.conftest import put_raw
from vlmforge.artifacts.manifest import EngineManifest
from vlmforge.cli.store import app
from vlmforge.errors import IntegrityError
from vlmforge.store import ArtifactStore, PublishResult
from vlmforge.store.base import alias_key

MODEL = "qwen2-vl-2b"


def _same_second(n: int) -> list[EngineManifest]:
    """``n`` manifests of one fingerprint created in the same second: one build id."""
    base = new_manifest()
    return [base.model_copy(update={"created_at": base.created_at + timedelta(milliseconds=100 * i + 100)})
            for i in range(n)]


def test_same_fingerprint_in_the_same_second_is_idempotent(store: ArtifactStore, tmp_path: Path) -> None:
    """The second publish raised StoreConflict ("already exists with different content")."""
    first_m, second_m = _same_second(2)
    assert first_m.build_id == second_m.build_id and first_m != second_m
    first = store.publish(make_engine(tmp_path / "a", standard_files("a")), first_m)
    # A rebuild of the same inputs is not byte-identical: the stored build stands, nothing is uploaded.
    second = store.publish(make_engine(tmp_path / "b", {"rank0.engine": payload("other", 5000)}), second_m)
    assert first.created and not second.created and second.manifest == first.manifest
    assert second.uploaded_blobs == 0 and not second.aliases[0].moved
    assert [b.build_id for b in store.list_builds()] == [first_m.build_id]


def test_concurrent_same_second_publishes_both_succeed(store: ArtifactStore, tmp_path: Path) -> None:
    manifests = _same_second(3)
    engines = [make_engine(tmp_path / f"e{i}", {"rank0.engine": payload(f"r{i}", 3000), "c": b"%d" % i})
               for i in range(3)]
    barrier = threading.Barrier(3)
    results: list[PublishResult | BaseException] = []

    def run(i: int) -> None:
        barrier.wait()
        try:
            results.append(store.publish(engines[i], manifests[i]))
        except BaseException as exc:  # noqa: BLE001
            results.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    published = [r for r in results if isinstance(r, PublishResult)]
    assert len(published) == 3, results
    assert sum(r.created for r in published) == 1
    assert all(r.manifest == published[0].manifest for r in published)
    assert store.resolve(MODEL) == published[0].manifest


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ({"build_id": "../../llava-1.5-7b/builds/x"}, "invalid build id"),
        ({"alias": "other"}, "describes qwen2-vl-2b@other, not qwen2-vl-2b@evil"),
        ({"schema_version": 9}, "schema_version 9 is newer than this vlmforge supports"),
        (None, "not valid JSON"),
    ],
)
def test_a_bad_alias_record_is_reported_and_the_rest_listed(
    store: ArtifactStore, store_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    record: dict[str, object] | None, reason: str,
) -> None:
    """One unreadable or crafted alias record broke `store ls` for the whole store and was joined into a path."""
    result = store.publish(make_engine(tmp_path / "e", standard_files("a")), new_manifest())
    store.publish(make_engine(tmp_path / "l", standard_files("l")), new_manifest("llava-1.5-7b", seed="l"))
    good = json.loads(store._get(alias_key(MODEL, "latest"))[0])
    key = alias_key(MODEL, "evil")
    data = b"{not json" if record is None else json.dumps({**good, "alias": "evil", **record}).encode()
    put_raw(store_url, key, data)

    with caplog.at_level(logging.WARNING):
        models = store.list_models()
        builds = store.list_builds(MODEL)
    assert {m.model: m.aliases for m in models} == {
        "llava-1.5-7b": {"latest": store.resolve("llava-1.5-7b").build_id},
        MODEL: {"latest": result.manifest.build_id},
    }
    assert [b.aliases for b in builds] == [["latest"]]
    assert any(key in r.getMessage() and reason in r.getMessage() for r in caplog.records)
    with pytest.raises(IntegrityError, match=f"refused alias record {key}: .*{reason.split()[0]}"):
        store.resolve(f"{MODEL}@evil")

    cli = CliRunner().invoke(app, ["ls", "--store", store_url, "--json"])
    assert cli.exit_code == 0 and [m["model"] for m in json.loads(cli.stdout)] == ["llava-1.5-7b", MODEL]
    # An explicit promotion repairs the record; a publish refuses to move an alias it cannot read.
    with pytest.raises(IntegrityError, match="repair it with `vlmforge store promote"):
        store.move_alias(f"{MODEL}#{result.manifest.build_id}", "evil")
    assert store.promote(f"{MODEL}#{result.manifest.build_id}", "evil").moved
    assert store.resolve(f"{MODEL}@evil") == result.manifest
