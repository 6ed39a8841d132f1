"""vlmforge.build.watch without Prefect: the watch list, and revision checks against a real (local) store."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.helpers.checkpoints import directory_checkpoint, publish_build, spec_file, tiny_llava_spec
from vlmforge.build.watch import (
    WATCH_ENV,
    check,
    check_target,
    event_payload,
    event_resource,
    resolve_target,
    watch_targets,
)
from vlmforge.errors import SpecError, VlmforgeError
from vlmforge.sources import open_source
from vlmforge.specs.schema import spec_from_dict
from vlmforge.store import open_store


def test_check_never_built_unchanged_new_revision_and_other_source(tmp_path: Path) -> None:
    store_url = str(tmp_path / "store")
    source = directory_checkpoint(tmp_path / "ckpt")
    spec = tiny_llava_spec("watched", f"file://{source}")
    with open_store(store_url) as store:
        first = check(spec, store)
    assert first.changed and first.old_revision is None and first.reason == "no published build yet"
    assert first.new_revision == open_source(spec.source).resolve_revision()

    build = publish_build(store_url, spec, first.new_revision, tmp_path)
    with open_store(store_url) as store:
        same = check(spec, store)
    assert not same.changed and same.old_revision == same.new_revision == first.new_revision
    assert same.last_build == build

    (source / "weights.bin").write_text("v2")
    with open_store(store_url) as store:
        moved = check(spec, store)
    assert moved.changed and moved.old_revision == first.new_revision != moved.new_revision
    assert moved.reason.startswith("new revision")

    publish_build(store_url, spec, moved.new_revision, tmp_path, source="file:///elsewhere")
    with open_store(store_url) as store:
        elsewhere = check(spec, store)
    assert elsewhere.changed and "came from file:///elsewhere" in elsewhere.reason


def test_an_unresolvable_source_is_reported_not_raised(tmp_path: Path) -> None:
    spec_path = spec_file(tmp_path / "gone.yaml", "gone", f"file://{tmp_path / 'missing'}")
    with open_store(str(tmp_path / "store")) as store:
        result = check_target(resolve_target(str(spec_path), store, tmp_path), store)
    assert not result.changed and result.new_revision is None
    assert "source directory not found" in (result.error or "")


def test_watch_list_from_arguments_watch_file_or_store(tmp_path: Path) -> None:
    store_url = str(tmp_path / "store")
    source = directory_checkpoint(tmp_path / "ckpt")
    (tmp_path / "specs").mkdir()
    spec_path = spec_file(tmp_path / "specs" / "a.yaml", "from-file", f"file://{source}")
    published = tiny_llava_spec("in-store", f"file://{source}").model_copy(
        update={"limits": tiny_llava_spec("x", "tiny://llava").limits.model_copy(update={"max_batch_size": 2})})
    publish_build(store_url, published, "sha256:" + "0" * 64, tmp_path)

    with open_store(store_url) as store:
        # 1. given: a spec path and model names
        given = watch_targets(store, [str(spec_path), "in-store", "tiny-llava"], env={})
        assert [(t.model, t.origin.split()[0]) for t in given] == [
            ("from-file", "spec"), ("in-store", "store"), ("tiny-llava", "catalog")]
        # the store's spec is the one that was published (overrides included), not a catalog default
        assert given[1].spec["limits"]["max_batch_size"] == 2

        # 2. $VLMFORGE_WATCH: paths relative to the file
        watch_file = tmp_path / "watch.yaml"
        watch_file.write_text("models:\n  - specs/a.yaml\n  - in-store\n")
        from_file = watch_targets(store, None, env={WATCH_ENV: str(watch_file)})
        assert [t.model for t in from_file] == ["from-file", "in-store"] and not any(t.error for t in from_file)
        watch_file.write_text("- in-store\n")
        assert [t.model for t in watch_targets(store, None, env={WATCH_ENV: str(watch_file)})] == ["in-store"]

        # 3. default: every model of the store
        assert [t.model for t in watch_targets(store, None, env={})] == ["in-store"]

        # errors: one bad entry is reported in its target; a model twice or a bad file stops the run
        unknown, = watch_targets(store, ["no-such-model"], env={})
        assert "unknown model 'no-such-model'" in (unknown.error or "")
        with pytest.raises(VlmforgeError, match="watched twice"):
            watch_targets(store, ["in-store", "in-store"], env={})
        watch_file.write_text("models: tiny-llava\n")
        with pytest.raises(SpecError, match="a watch file is a list"):
            watch_targets(store, None, env={WATCH_ENV: str(watch_file)})


def test_the_event_carries_the_spec_and_both_revisions(tmp_path: Path) -> None:
    source = directory_checkpoint(tmp_path / "ckpt")
    spec_path = spec_file(tmp_path / "m.yaml", "evented", f"file://{source}")
    with open_store(str(tmp_path / "store")) as store:
        target = resolve_target(str(spec_path), store, tmp_path)
        result = check_target(target, store)
    payload = event_payload(target, result)
    assert payload["model"] == "evented" and payload["old_revision"] is None
    assert payload["new_revision"] == result.new_revision and payload["source"] == f"file://{source}"
    assert spec_from_dict(payload["spec"]) == spec_from_dict(yaml.safe_load(spec_path.read_text()))
    assert event_resource("evented") == {"prefect.resource.id": "vlmforge.model.evented",
                                         "prefect.resource.name": "evented"}
