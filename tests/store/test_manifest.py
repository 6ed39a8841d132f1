"""The engine manifest: validation (paths, names), immutability, serialization and build ids."""

from __future__ import annotations

import json
import posixpath
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from tests.helpers.store import T0, new_manifest
from vlmforge.artifacts.manifest import EngineManifest, FileEntry, check_relative_path, new_build_id
from vlmforge.errors import IntegrityError

SHA = "a" * 64


def test_roundtrip_and_immutability() -> None:
    m = new_manifest().with_files([FileEntry(path="b/x.engine", sha256=SHA, size=3),
                                   FileEntry(path="a.json", sha256=SHA, size=3)])
    assert [f.path for f in m.files] == ["a.json", "b/x.engine"]
    again = EngineManifest.from_json(m.to_json())
    assert again == m and again.total_size == 6 and again.ref == f"qwen2-vl-2b#{m.build_id}"
    with pytest.raises(ValidationError):
        m.model = "other"  # type: ignore[misc]
    assert json.loads(m.to_json())["schema_version"] == 1


def test_build_ids_sort_by_time() -> None:
    ids = [new_build_id("0123456789" + "f" * 54, T0 + timedelta(seconds=s)) for s in (0, 1, 59, 3600, 86400 * 40)]
    assert ids == sorted(ids) and ids[0] == "20261126T050000Z-01234567"
    local = T0.astimezone(timezone(timedelta(hours=-8)))
    assert new_build_id("f" * 64, local) == "20261126T050000Z-ffffffff"
    m = EngineManifest.create(model="m", fingerprint="f" * 64, created_at=local, toolchain="hf",
                              source={"uri": "hf://x"})
    assert m.created_at.tzinfo is not None and m.created_at.utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    "path",
    ["../x", "/abs", "a/../../x", "a/./b", "a\\b", "a//b", "a/", "", ".", "..", "x\x00y", "x\ny",
     ".vlmforge-manifest.json", ".vlmforge-tmp/x", "C:/x", "c:"],
)
def test_bad_paths_rejected(path: str) -> None:
    with pytest.raises(ValueError):
        check_relative_path(path)
    with pytest.raises(ValidationError):
        FileEntry(path=path, sha256=SHA, size=1)


@pytest.mark.parametrize("path", ["config.json", "visual/visual_encoder.engine", "a/b/c/d.bin", ".hidden", "x..y"])
def test_good_paths_accepted(path: str) -> None:
    assert FileEntry(path=path, sha256=SHA, size=0).path == path


PATHISH = st.lists(st.sampled_from(["a", "b", "/", ".", "..", "\\", ":", "C", " ", "~"]), max_size=10).map("".join)


@given(st.one_of(PATHISH, st.text(max_size=20)))
def test_accepted_paths_stay_inside_the_destination(path: str) -> None:
    try:
        check_relative_path(path)
    except ValueError:
        return
    joined = posixpath.normpath(posixpath.join("/dest", path))
    assert joined.startswith("/dest/") and joined != "/dest"
    assert posixpath.join("/dest", path) == joined  # nothing for normalisation to collapse


def test_file_list_consistency() -> None:
    entry = FileEntry(path="a", sha256=SHA, size=1)
    with pytest.raises(ValidationError, match="duplicate"):
        new_manifest().with_files([entry, entry])
    with pytest.raises(ValidationError, match="also used as a directory"):
        new_manifest().with_files([entry, FileEntry(path="a/b", sha256=SHA, size=1)])


def test_bad_fields_rejected() -> None:
    base = json.loads(new_manifest().to_json())
    for field, value in [("model", "a/b"), ("model", ".."), ("build_id", "../x"), ("fingerprint", "xyz"),
                         ("toolchain", "onnx"), ("created_at", "2026-11-26T05:00:00"), ("world_size", 0)]:
        with pytest.raises(IntegrityError, match="refused"):
            EngineManifest.from_json(json.dumps({**base, field: value}).encode())
    with pytest.raises(IntegrityError, match="upgrade vlmforge"):
        EngineManifest.from_json(json.dumps({**base, "schema_version": 2}).encode())
    with pytest.raises(IntegrityError, match="not valid JSON"):
        EngineManifest.from_json(b"{nope")
    with pytest.raises(IntegrityError, match="refused"):
        EngineManifest.from_json(json.dumps({**base, "surprise": 1}).encode())
    assert isinstance(datetime.fromisoformat(base["created_at"]), datetime)
