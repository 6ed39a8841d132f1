"""Pulls that leave top-level folders out (a deploy backend takes only what it reads), on both backends: what is
left out is never downloaded, the directory records it, a reuse checks only what it holds and what is needed (no
spurious re-pull), a pull that needs more fetches only the rest, and a damaged or missing file is repaired."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.store import make_engine, new_manifest, payload, read_tree, standard_files
from vlmforge.errors import StoreError
from vlmforge.store import ArtifactStore, PullCheck
from vlmforge.store.keys import SUBSET

MODEL = "qwen2-vl-2b"
HF = {"hf/config.json": b'{"architectures": ["X"]}', "hf/model.safetensors": payload("hf", 200 * 1024),
      "hf/tokenizer.json": payload("tokenizer", 4096)}  # the same bytes as tokenizer/tokenizer.json: one blob


def _published(store: ArtifactStore, tmp_path: Path) -> tuple[Path, dict[str, int]]:
    engine = make_engine(tmp_path / "engine", {**standard_files("a"), **HF})
    manifest = store.publish(engine, new_manifest()).manifest
    return engine, {f.path: f.size for f in manifest.files}


def _tree(root: Path, *, without: tuple[str, ...] = ()) -> dict[str, bytes]:
    return {path: data for path, data in read_tree(root).items() if path.split("/")[0] not in without}


def test_a_left_out_folder_is_never_downloaded_and_is_recorded(store: ArtifactStore, tmp_path: Path) -> None:
    engine, sizes = _published(store, tmp_path)
    dest = tmp_path / "cache" / "engine"
    result = store.pull_engine(MODEL, dest, exclude=frozenset({"hf"}))
    assert not (dest / "hf").exists() and _tree(dest) == _tree(engine, without=("hf",))
    assert json.loads((dest / SUBSET).read_text()) == ["hf"] and result.excluded == ["hf"]
    assert result.downloaded_files == len(sizes) - 3  # tokenizer.json's blob: fetched once, for tokenizer/ only
    assert result.downloaded_bytes == sum(s for p, s in sizes.items() if not p.startswith("hf/"))
    assert "(without hf/)" in result.summary and f"{len(sizes) - 3} files" in result.summary

    again = store.pull_engine(MODEL, dest, exclude=frozenset({"hf"}))  # no spurious re-pull of the missing hf/
    assert again.reused and again.downloaded_files == 0 and again.excluded == ["hf"]
    assert "without hf/" in again.summary and f"{len(sizes) - 3} files present" in again.summary
    narrower = store.pull_engine(MODEL, dest, exclude=frozenset({"hf", "visual"}))  # needs less: reused as well
    assert narrower.reused and (dest / "visual").is_dir()


def test_a_pull_that_needs_more_fetches_only_the_rest(store: ArtifactStore, tmp_path: Path) -> None:
    engine, sizes = _published(store, tmp_path)
    dest = tmp_path / "cache" / "engine"
    store.pull_engine(MODEL, dest, exclude=frozenset({"hf"}))
    inode = (dest / "rank0.engine").stat().st_ino
    more = store.pull_engine(MODEL, dest)  # the whole build
    assert not more.reused and more.excluded == [] and not (dest / SUBSET).exists()
    # hf/'s own blobs, and the one it shares with tokenizer/ (both of its paths are written again)
    assert more.downloaded_files == 4 and more.resumed_files == len(sizes) - 4 and more.check is PullCheck.SIZES
    assert more.downloaded_bytes == sum(s for p, s in sizes.items() if p.startswith("hf/"))
    assert (dest / "rank0.engine").stat().st_ino == inode  # kept, not copied or fetched again
    assert _tree(dest) == _tree(engine)
    assert store.pull_engine(MODEL, dest, exclude=frozenset({"hf"})).reused  # holding more than needed is fine

    hf_only = tmp_path / "cache" / "serve"
    store.pull_engine(MODEL, hf_only, exclude=frozenset({"rank0.engine", "visual"}))  # files are not folders
    assert (hf_only / "rank0.engine").is_file() and not (hf_only / "visual").exists()
    both = store.pull_engine(MODEL, hf_only, exclude=frozenset({"hf"}))  # another backend's subset: the union
    assert not both.reused and both.downloaded_files == 1 and sorted(both.excluded) == []
    assert _tree(hf_only) == _tree(engine)


def test_a_missing_or_damaged_needed_file_is_repaired(store: ArtifactStore, tmp_path: Path) -> None:
    engine, sizes = _published(store, tmp_path)
    dest = tmp_path / "cache" / "engine"
    store.pull_engine(MODEL, dest, exclude=frozenset({"visual"}))
    (dest / "hf" / "config.json").unlink()
    with (dest / "hf" / "model.safetensors").open("r+b") as handle:
        handle.truncate(10)
    repaired = store.pull_engine(MODEL, dest, exclude=frozenset({"visual"}))
    assert not repaired.reused and repaired.check is PullCheck.SHA256 and repaired.excluded == ["visual"]
    assert sorted(repaired.repaired) == ["hf/config.json is missing",
                                         f"hf/model.safetensors has 10 bytes, not {sizes['hf/model.safetensors']}"]
    assert _tree(dest) == _tree(engine, without=("visual",))
    (dest / SUBSET).write_text("not json")  # an unreadable record is trusted with nothing: the rest is fetched
    assert not store.pull_engine(MODEL, dest, exclude=frozenset({"visual"})).reused
    assert _tree(dest) == _tree(engine)


@pytest.mark.parametrize("name", ["", "hf/sub", "..", ".vlmforge-manifest.json", "*"])
def test_exclude_takes_top_level_folder_names(store: ArtifactStore, tmp_path: Path, name: str) -> None:
    _published(store, tmp_path)
    with pytest.raises(StoreError, match="exclude takes top-level folder names"):
        store.pull_engine(MODEL, tmp_path / "out", exclude=frozenset({name}))
    assert not (tmp_path / "out").exists()
