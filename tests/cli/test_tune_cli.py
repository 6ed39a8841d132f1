"""`vlmforge tune` refuses what it cannot tune before anything is pulled, loaded or compiled, naming the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli.test_cli import vlmforge
from tests.helpers.store import make_engine, new_manifest, standard_files
from vlmforge.store import LocalStore


@pytest.fixture()
def store_with_build(tmp_path: Path) -> tuple[str, str]:
    """A local store holding one (TensorRT-like) build: (its URL, the build's ref)."""
    url = str(tmp_path / "store")
    engine = make_engine(tmp_path / "engine", standard_files("t", big=2048))
    with LocalStore(Path(url)) as store:
        manifest = store.publish(engine, new_manifest()).manifest
    return url, manifest.ref


def test_tune_refuses_a_directory_that_names_no_published_build(tmp_path: Path) -> None:
    engine = tmp_path / "engine"
    engine.mkdir()
    (engine / "engine.json").write_text("{}")
    done = vlmforge("tune", str(engine), "--store", str(tmp_path / "store"))
    assert done.returncode == 2
    assert "engine.json" in done.stderr or "no published build" in done.stderr


def test_tune_refuses_a_tensorrt_build_before_pulling(store_with_build: tuple[str, str], tmp_path: Path) -> None:
    url, ref = store_with_build
    done = vlmforge("tune", ref, "--store", url, "--cache-dir", str(tmp_path / "cache"))
    assert done.returncode == 2 and "TensorRT engine" in done.stderr and "nothing for torch to tune" in done.stderr
    assert not (tmp_path / "cache").exists()


def test_tune_refuses_an_unknown_build_naming_what_exists(store_with_build: tuple[str, str]) -> None:
    url, _ = store_with_build
    done = vlmforge("tune", "qwen2-vl-2b@nope", "--store", url)
    assert done.returncode == 2 and "alias 'nope'" in done.stderr and "latest" in done.stderr


def test_deploy_tells_a_process_runner_the_store_it_pulled_from(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The runner looks for the build's tune artifacts where deploy found the build (a local path made absolute)."""
    from vlmforge.deploy.service import runner_tune_store, serve_args

    monkeypatch.chdir(tmp_path)
    assert runner_tune_store("s3://bucket/engines", from_store=True, container=False) == "s3://bucket/engines"
    assert runner_tune_store("store", from_store=True, container=False) == str(tmp_path / "store")
    monkeypatch.setenv("VLMFORGE_STORE", "s3://other/x")
    assert runner_tune_store(None, from_store=True, container=False) == "s3://other/x"
    # a local engine directory has no store; a container runner has no mount of it
    assert runner_tune_store("store", from_store=False, container=False) is None
    assert runner_tune_store("s3://bucket/engines", from_store=True, container=True) is None
    args = serve_args(tune_store="s3://bucket/engines")
    assert args[args.index("--tune-store") + 1] == "s3://bucket/engines"
    assert "--tune-store" not in serve_args()
