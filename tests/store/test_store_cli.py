"""The `vlmforge store` CLI on both backends: listings with --json, pull, promote, gc, exit code 2 on user errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.helpers.store import make_engine, new_manifest, read_tree, standard_files
from tests.store.conftest import make_store
from vlmforge.cli.store import app

runner = CliRunner()


@pytest.fixture()
def published(store_url: str, tmp_path: Path) -> tuple[str, list[str], Path]:
    store = make_store(store_url)
    ids = []
    engine = tmp_path
    for i in range(3):
        engine = make_engine(tmp_path / f"e{i}", standard_files(f"cli{i}"))
        ids.append(store.publish(engine, new_manifest(minutes=i, seed=f"cli{i}")).manifest.build_id)
    store.close()
    return store_url, ids, engine


def run(*args: str) -> object:
    return runner.invoke(app, list(args))


def test_listings_json(published: tuple[str, list[str], Path]) -> None:
    url, ids, _ = published
    result = run("ls", "--store", url, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == [{"model": "qwen2-vl-2b", "builds": 3, "aliases": {"latest": ids[2]}}]
    result = run("ls", "qwen2-vl-2b", "--store", url, "--json")
    builds = json.loads(result.stdout)
    assert [b["build_id"] for b in builds] == ids[::-1] and builds[0]["aliases"] == ["latest"]
    result = run("show", f"qwen2-vl-2b#{ids[0]}", "--store", url, "--json")
    assert json.loads(result.stdout)["build_id"] == ids[0]
    for args in (("ls",), ("ls", "qwen2-vl-2b"), ("show", "qwen2-vl-2b")):
        result = run(*args, "--store", url)
        assert result.exit_code == 0 and ids[2] in result.stdout


def test_env_default_store(published: tuple[str, list[str], Path], monkeypatch: pytest.MonkeyPatch) -> None:
    url, ids, _ = published
    monkeypatch.setenv("VLMFORGE_STORE", url)
    result = run("ls", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)[0]["builds"] == 3


def test_pull_promote_gc(published: tuple[str, list[str], Path], tmp_path: Path) -> None:
    url, ids, engine = published
    dest = tmp_path / "pulled"
    result = run("pull", "qwen2-vl-2b", str(dest), "--store", url, "--no-progress")
    assert result.exit_code == 0, result.output
    assert ids[2] in result.stdout and read_tree(dest) == read_tree(engine)

    result = run("promote", f"qwen2-vl-2b#{ids[0]}", "stable", "--store", url, "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["moved"] is True
    result = run("promote", f"qwen2-vl-2b#{ids[1]}", "stable", "--store", url, "--expect", ids[0])
    assert result.exit_code == 0 and f"{ids[0]} -> {ids[1]}" in result.stdout

    result = run("gc", "--keep", "1", "--store", url, "--json")
    report = json.loads(result.stdout)
    assert not report["applied"] and [b["build_id"] for b in report["deleted"]] == [ids[0]]
    result = run("gc", "--keep", "1", "--store", url)
    assert "would delete 1 builds" in result.stdout and "--apply" in result.stdout
    result = run("gc", "--keep", "1", "--apply", "--store", url, "--json")
    assert json.loads(result.stdout)["applied"] is True
    result = run("ls", "qwen2-vl-2b", "--store", url, "--json")
    assert [b["build_id"] for b in json.loads(result.stdout)] == [ids[2], ids[1]]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("show", "nope"), "model 'nope' not found"),
        (("show", "qwen2-vl-2b@stable"), "has no alias 'stable'"),
        (("show", "a/../b"), "bad reference"),
        (("ls", "nope"), "model 'nope' not found"),
        (("promote", "qwen2-vl-2b", "stable", "--expect", "20200101T000000Z-00000000"), "stable conflict"),
        (("promote", "qwen2-vl-2b", "bad/alias"), "invalid alias"),
    ],
)
def test_user_errors_exit_2(published: tuple[str, list[str], Path], args: tuple[str, ...], message: str) -> None:
    url, _, _ = published
    result = run(*args, "--store", url)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert "Traceback" not in result.output and result.stderr.count("\n") == 1


def test_pull_into_existing_dir_exit_2(published: tuple[str, list[str], Path], tmp_path: Path) -> None:
    url, ids, _ = published
    dest = tmp_path / "occupied"
    dest.mkdir()
    (dest / "other").write_text("x")
    result = run("pull", "qwen2-vl-2b", str(dest), "--store", url)
    assert result.exit_code == 2 and "already exists" in result.stderr
    result = run("pull", "qwen2-vl-2b", str(dest), "--store", url, "--force", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["manifest"]["build_id"] == ids[2]


def test_bad_store_urls_exit_2(tmp_path: Path) -> None:
    result = run("ls", "--store", "gs://bucket/x")
    assert result.exit_code == 2 and "unsupported store URL" in result.stderr
    result = run("ls", "--store", "s3:///nobucket")
    assert result.exit_code == 2 and "bad store URL" in result.stderr
    (tmp_path / "file").write_text("x")
    result = run("ls", "--store", str(tmp_path / "file"))
    assert result.exit_code == 2 and "not a directory" in result.stderr


def test_missing_bucket_exit_2(aws_env: str) -> None:
    result = run("ls", "--store", "s3://no-such-bucket-vlmforge/x")
    assert result.exit_code == 2 and "does not exist" in result.stderr


def test_default_store_url(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from vlmforge.store import LocalStore, default_store_url, open_store
    from vlmforge.store.s3 import S3Store

    monkeypatch.delenv("VLMFORGE_STORE", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert default_store_url() == str(tmp_path / "data" / "vlmforge" / "store")
    store = open_store()
    assert isinstance(store, LocalStore) and store.root == tmp_path / "data" / "vlmforge" / "store"
    assert not store.root.exists()  # opening (or listing) creates nothing
    assert store.list_models() == []
    monkeypatch.setenv("VLMFORGE_STORE", "s3://bucket/some/prefix/")
    s3 = open_store()
    assert isinstance(s3, S3Store) and (s3.bucket, s3.prefix, s3.url) == ("bucket", "some/prefix", "s3://bucket/some/prefix")
    assert isinstance(open_store(f"file://{tmp_path}/x"), LocalStore)


def test_pull_says_what_it_checked(published: tuple[str, list[str], Path], tmp_path: Path) -> None:
    """`store pull` printed "8 files verified" for a reused copy it had not checked at all."""
    url, _, engine = published
    dest = tmp_path / "engine"
    first = run("pull", "qwen2-vl-2b", str(dest), "--store", url, "--no-progress")
    assert first.exit_code == 0 and "5 files downloaded into" in first.stdout and "sha256 checked" in first.stdout
    again = run("pull", "qwen2-vl-2b", str(dest), "--store", url, "--no-progress")
    assert "already holds it: 5 files present with the expected sizes (not re-hashed" in again.stdout
    assert "verified" not in again.stdout
    (dest / "config.json").unlink()
    repaired = run("pull", "qwen2-vl-2b", str(dest), "--store", url, "--no-progress", "--json")
    report = json.loads(repaired.stdout)
    assert report["repaired"] == ["config.json is missing"] and report["check"] == "sha256"
    assert read_tree(dest) == read_tree(engine)
    verified = run("pull", "qwen2-vl-2b", str(dest), "--store", url, "--verify")
    assert "5 files re-hashed, every sha256 matches" in verified.stdout


def test_gc_cli_refuses_unreadable_records_and_lists_what_it_removes(published: tuple[str, list[str], Path]) -> None:
    from tests.store.conftest import put_raw
    from vlmforge.store.base import build_key

    url, ids, _ = published
    dry = run("gc", "--keep", "1", "--grace", "0", "--store", url)
    assert dry.exit_code == 0 and dry.stdout.count("would delete blob ") == 4
    assert "would delete 2 builds, 4 blobs" in dry.stdout
    key = build_key("qwen2-vl-2b", ids[0])
    put_raw(url, key, b'{"schema_version": 2}')
    dry = CliRunner(env={"COLUMNS": "80"}).invoke(app, ["gc", "--keep", "1", "--store", url])  # a narrow terminal
    assert dry.exit_code == 0 and f"warning: unreadable {key}: refused manifest" in dry.stdout, "the key is not split"
    assert "--apply will refuse" in dry.stdout
    applied = run("gc", "--keep", "1", "--apply", "--store", url)
    assert applied.exit_code == 2 and applied.stderr.startswith("error: gc refused") and "--ignore-unreadable" in applied.stderr
    forced = run("gc", "--keep", "1", "--apply", "--ignore-unreadable", "--store", url, "--json")
    assert forced.exit_code == 0 and json.loads(forced.stdout)["ignored_unreadable"] is True
    bad = run("gc", "--grace", "soon", "--store", url)
    assert bad.exit_code == 2 and "--grace 'soon'" in bad.stderr


def test_gc_and_pull_refuse_a_directory_that_is_not_a_store(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / "tmp" / "work").mkdir(parents=True)
    (home / "tmp" / "work" / "thesis.tex").write_text("years of work")
    for args in (("gc", "--apply"), ("gc",), ("pull", "m", str(tmp_path / "x"))):
        result = run(*args, "--store", str(home))
        assert result.exit_code == 2 and "is not a vlmforge store" in result.stderr, result.output
    assert (home / "tmp" / "work" / "thesis.tex").read_text() == "years of work"


def test_init_creates_and_adopts(tmp_path: Path) -> None:
    result = run("init", "--store", str(tmp_path / "new"), "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["adopted"] is False
    old = tmp_path / "old"
    (old / "models" / "m" / "builds").mkdir(parents=True)
    result = run("init", "--store", str(old))
    assert result.exit_code == 2 and "--adopt" in result.stderr
    result = run("init", "--store", str(old), "--adopt")
    assert result.exit_code == 0 and "adopted" in result.stdout


def test_listings_keep_names_ids_and_aliases_whole_on_80_columns(store_url: str, tmp_path: Path) -> None:
    """`store ls` on an 80-column terminal cut every column to fit (`tiny-llava-3…`): names, build ids and alias
    entries stay whole now, and less important columns are dropped or wrapped."""
    model = "tiny-llava-3-long-model-name-for-narrow-terminals"
    store = make_store(store_url)
    ids = []
    for i in range(2):
        engine = make_engine(tmp_path / f"e{i}", standard_files(f"narrow{i}", big=1000))
        manifest = new_manifest(model, minutes=i, seed=f"narrow{i}")
        ids.append(store.publish(engine, manifest, aliases=("latest", "production-candidate")).manifest.build_id)
    store.close()
    narrow = CliRunner(env={"COLUMNS": "80"})
    models = narrow.invoke(app, ["ls", "--store", store_url])
    builds = narrow.invoke(app, ["ls", model, "--store", store_url])
    assert models.exit_code == 0 and builds.exit_code == 0, models.output + builds.output
    for output in (models.stdout, builds.stdout):
        assert max(len(line) for line in output.splitlines()) <= 80, output
        assert "…" not in output
    assert model in models.stdout and f"production-candidate={ids[1]}" in models.stdout
    assert all(build_id in builds.stdout for build_id in ids) and "production-candidate" in builds.stdout
    wide = CliRunner(env={"COLUMNS": "200"}).invoke(app, ["ls", model, "--store", store_url])
    assert "CREATED (UTC)" in wide.stdout and "CREATED (UTC)" not in builds.stdout  # the id carries the time


def test_pull_exclude_leaves_folders_out_and_says_so(published: tuple[str, list[str], Path], tmp_path: Path) -> None:
    url, _, engine = published
    dest = tmp_path / "engine"
    first = run("pull", "qwen2-vl-2b", str(dest), "--store", url, "--exclude", "visual", "--exclude", "tokenizer",
                "--json")
    report = json.loads(first.stdout)
    assert first.exit_code == 0 and report["excluded"] == ["tokenizer", "visual"] and report["downloaded_files"] == 3
    assert not (dest / "visual").exists() and not (dest / "tokenizer").exists()
    again = run("pull", "qwen2-vl-2b", str(dest), "--store", url, "--exclude", "visual", "--exclude", "tokenizer")
    assert "already holds it (without tokenizer/, visual/): 3 files present" in again.stdout
    whole = run("pull", "qwen2-vl-2b", str(dest), "--store", url, "--no-progress")
    assert whole.exit_code == 0 and "2 files downloaded into" in whole.stdout and read_tree(dest) == read_tree(engine)
    bad = run("pull", "qwen2-vl-2b", str(tmp_path / "other"), "--store", url, "--exclude", "visual/x")
    assert bad.exit_code == 2 and "exclude takes top-level folder names" in bad.stderr
