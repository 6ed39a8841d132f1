"""Fingerprints and the resumable work dir."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlmforge.build.fingerprint import fingerprint, spec_for_fingerprint
from vlmforge.build.workdir import Workdir
from vlmforge.errors import BuildError
from vlmforge.specs.catalog import load_model_or_spec


def test_fingerprint_is_deterministic_and_refuses_unknown_types() -> None:
    assert fingerprint({"b": 1, "a": [1, 2]}) == fingerprint({"a": [1, 2], "b": 1})
    assert fingerprint(1) != fingerprint("1")
    with pytest.raises(TypeError, match="cannot fingerprint a object"):
        fingerprint(object())


def test_spec_fingerprint_ignores_only_the_listed_fields() -> None:
    base = load_model_or_spec("llava-1.5-7b-hf")
    same = load_model_or_spec("llava-1.5-7b-hf", {"validation.min_token_agreement": 0.5, "dialect": "0.9"})
    other = load_model_or_spec("llava-1.5-7b-hf", {"validation.max_new_tokens": 10})
    assert fingerprint(spec_for_fingerprint(base)) == fingerprint(spec_for_fingerprint(same))
    assert fingerprint(spec_for_fingerprint(base)) != fingerprint(spec_for_fingerprint(other))


def test_stage_runs_once_then_is_skipped(tmp_path: Path) -> None:
    work = Workdir(tmp_path)
    calls = []

    def stage(out: Path) -> dict:
        calls.append(out)
        (out / "data.bin").write_bytes(b"x" * 10)
        return {"n": 1}

    first = work.run("m", "convert", "f" * 64, stage)
    again = work.run("m", "convert", "f" * 64, stage)
    assert not first.skipped and again.skipped and len(calls) == 1
    assert "fingerprint ffffffffffff unchanged" in again.reason
    assert work.run("m", "convert", "e" * 64, stage).skipped is False


def test_a_failed_stage_leaves_nothing(tmp_path: Path) -> None:
    work = Workdir(tmp_path)

    def broken(out: Path) -> dict:
        (out / "half.bin").write_bytes(b"1")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        work.run("m", "convert", "a" * 64, broken)
    assert work.completed("m", "convert", "a" * 64) is None
    assert not list((tmp_path / "m").iterdir())


def test_a_damaged_stage_is_redone(tmp_path: Path) -> None:
    work = Workdir(tmp_path)
    outcome = work.run("m", "s", "b" * 64, lambda out: (out / "w.bin").write_bytes(b"12345") and {})
    (outcome.path / "w.bin").write_bytes(b"12")
    assert work.completed("m", "s", "b" * 64) is None


def test_disk_full_is_a_clear_error(tmp_path: Path) -> None:
    import errno

    def full(out: Path) -> dict:
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(BuildError, match="no space left in the work dir"):
        Workdir(tmp_path).run("m", "convert", "c" * 64, full)


def test_a_stage_clears_dead_builds_partials_but_not_a_live_ones(tmp_path: Path) -> None:
    """Two builds sharing a work dir (a watch-triggered one and a manual one): a stage leaves the other live
    process's scratch folder alone and clears those of processes that died."""
    import subprocess

    work = Workdir(tmp_path)
    final = work.stage_path("m", "convert", "f" * 64)
    final.parent.mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    other = subprocess.Popen(["sleep", "30"])
    try:
        for pid in (dead.pid, other.pid):
            (final.parent / f".{final.name}.partial-{pid}").mkdir()
        work.run("m", "convert", "f" * 64, lambda out: {"n": 1})
        assert (final.parent / f".{final.name}.partial-{other.pid}").is_dir()
        assert not (final.parent / f".{final.name}.partial-{dead.pid}").exists()
    finally:
        other.kill()
        other.wait()



def test_a_source_that_moves_between_resolve_and_fetch_is_not_cached_under_the_old_revision(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fetch stage is keyed by the resolved revision: the bytes stored under that key must be that revision's.
    Before the fix the download took what the directory held at fetch time, and a later build of the old revision
    reused the new bytes as if they were it."""
    from tests.helpers.checkpoints import directory_checkpoint, tiny_llava_spec
    from vlmforge.build.pipeline import HfPipeline
    from vlmforge.sources import open_source
    from vlmforge.sources.base import FetchedSource
    from vlmforge.sources.local import LocalSource

    src = directory_checkpoint(tmp_path / "src", "v1")
    real_resolve = LocalSource.resolve_revision
    moves = ["v2"]

    def resolve_then_move(self: LocalSource) -> str:
        revision = real_resolve(self)
        if moves:  # another writer replaces the checkpoint right after the build resolved it
            directory_checkpoint(src, moves.pop())
        return revision

    events: list[str] = []
    pipeline = HfPipeline(tiny_llava_spec("moving", f"file://{src}"), Workdir(tmp_path / "work"), device="cpu",
                          on_event=events.append)
    monkeypatch.setattr(LocalSource, "resolve_revision", resolve_then_move)
    outcome = pipeline.fetch()
    monkeypatch.undo()
    fetched = FetchedSource.model_validate(outcome.result)
    assert (outcome.path / "model" / "weights.bin").read_text() == "v2"
    assert fetched.revision == open_source(f"file://{src}").resolve_revision()
    assert outcome.path.name == Path(pipeline.workdir.stage_path("moving", "fetch",
                                                                  pipeline.fingerprints.fetch(fetched.revision))).name
    assert any("moved on since its revision was resolved" in event for event in events)
    stored = [p for p in outcome.path.parent.iterdir() if not p.name.startswith(".")]
    assert stored == [outcome.path]  # nothing kept under the first (v1) revision's key
