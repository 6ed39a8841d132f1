"""A pulled engine is checked every time it is reused, and absurd manifests are refused before any download, on
both backends."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.store import make_engine, new_manifest, read_tree, standard_files
from tests.store.conftest import put_raw
from vlmforge.errors import IntegrityError, StoreError
from vlmforge.store import ArtifactStore, PullCheck
from vlmforge.store.base import build_key

MODEL = "qwen2-vl-2b"


def _published(store: ArtifactStore, tmp_path: Path) -> Path:
    engine = make_engine(tmp_path / "engine", standard_files("a"))
    store.publish(engine, new_manifest())
    return engine


def test_a_damaged_copy_is_not_reused(store: ArtifactStore, tmp_path: Path) -> None:
    """A cached engine with a truncated and a deleted file was reported as verified and would have been served."""
    engine = _published(store, tmp_path)
    dest = tmp_path / "cache" / "engine"
    store.pull(MODEL, dest)
    (dest / "rank0.engine").write_bytes(b"truncated")
    (dest / "config.json").unlink()
    store.pull(MODEL, dest)  # what deploy does before it serves the cached engine
    assert read_tree(dest) == read_tree(engine)

    dest = tmp_path / "cache" / "engine2"
    first = store.pull_engine(MODEL, dest)
    assert not first.reused and first.check is PullCheck.SHA256 and first.downloaded_files == 5
    again = store.pull_engine(MODEL, dest)
    assert again.reused and again.check is PullCheck.SIZES and "not re-hashed" in again.summary

    with (dest / "rank0.engine").open("r+b") as handle:
        handle.truncate(1000)
    (dest / "tokenizer" / "tokenizer.json").unlink()
    repaired = store.pull_engine(MODEL, dest)
    assert not repaired.reused and repaired.check is PullCheck.SHA256
    assert sorted(repaired.repaired) == ["rank0.engine has 1000 bytes, not 1060921", "tokenizer/tokenizer.json is missing"]
    assert read_tree(dest) == read_tree(engine)
    assert "replaced a damaged copy" in repaired.summary


def test_verify_rehashes_a_reused_copy(store: ArtifactStore, tmp_path: Path) -> None:
    engine = _published(store, tmp_path)
    dest = tmp_path / "engine-copy"
    store.pull(MODEL, dest)
    data = bytearray((dest / "config.json").read_bytes())
    data[3] ^= 0x01  # same size, other bytes: only re-hashing sees it
    (dest / "config.json").write_bytes(bytes(data))
    assert store.pull_engine(MODEL, dest).reused  # sizes only, and it says so
    result = store.pull_engine(MODEL, dest, verify=True)
    assert result.repaired == ["config.json does not match its sha256"] and read_tree(dest) == read_tree(engine)
    clean = store.pull_engine(MODEL, dest, verify=True)
    assert clean.reused and clean.check is PullCheck.SHA256 and "re-hashed" in clean.summary


def test_a_file_replaced_by_a_symlink_is_damage(store: ArtifactStore, tmp_path: Path) -> None:
    engine = _published(store, tmp_path)
    dest = tmp_path / "dest"
    store.pull(MODEL, dest)
    outside = tmp_path / "outside.json"
    outside.write_bytes((dest / "config.json").read_bytes())
    (dest / "config.json").unlink()
    (dest / "config.json").symlink_to(outside)
    result = store.pull_engine(MODEL, dest)
    assert result.repaired == [f"config.json is not a regular file inside {dest}"]
    assert not (dest / "config.json").is_symlink() and read_tree(dest) == read_tree(engine)


def _stored_with_size(store: ArtifactStore, store_url: str, tmp_path: Path, size: int) -> str:
    _published(store, tmp_path)
    raw = json.loads(store.resolve(MODEL).to_json())
    raw["build_id"] = "20261126T060000Z-big00000"
    raw["files"][0]["size"] = size
    put_raw(store_url, build_key(MODEL, raw["build_id"]), json.dumps(raw).encode())
    return f"{MODEL}#{raw['build_id']}"


def test_an_absurd_size_is_refused_before_any_download(store: ArtifactStore, store_url: str, tmp_path: Path) -> None:
    """A file entry of 10**18 bytes gave a traceback (OSError: File too large) in the middle of a pull."""
    ref = _stored_with_size(store, store_url, tmp_path, 10**18)
    work = tmp_path / "work"
    with pytest.raises(IntegrityError, match=r"refused manifest .*files\.0\.size: .*larger than any store holds"):
        store.pull(ref, work / "out")
    assert not work.exists()


def test_a_pull_that_does_not_fit_is_refused_before_any_download(store: ArtifactStore, store_url: str,
                                                                  tmp_path: Path) -> None:
    ref = _stored_with_size(store, store_url, tmp_path, 4 * 1024**4)  # 4 TiB: a valid size, but not free here
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(StoreError, match=rf"pulling {ref} needs 4\.0 TiB .* in {work}, which has only .* free"):
        store.pull(ref, work / "out")
    assert list(work.iterdir()) == []
