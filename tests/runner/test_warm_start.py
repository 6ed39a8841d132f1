"""Warm starts, for real on the CPU (Inductor compiles the static decode step with the C++ compiler): `vlmforge tune`
stores a published tiny-llava build's compile caches in the store (both backends); a fresh `vlmforge serve` process
(its own empty Inductor cache directory) loads them before its warm-up and hits Inductor's FX graph cache where a cold
start misses; a key mismatch or a damaged blob is a warning and a cold compile."""

from __future__ import annotations

import contextlib
import json
import uuid
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.net import ROOT
from tests.helpers.runners import runner_env, start_runner, stop_runner
from tests.store.conftest import make_store
from vlmforge.store.base import blob_key

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                       reason="Inductor compiles for the CPU with a C++ compiler (apt-get install g++)"),
]

RUNNER = ("--device", "cpu", "--decode", "static", "--compile", "--compile-mode", "default", "--max-batch-size", "1",
          "--max-tokens", "8")
"""One bucket of the tiny model, compiled in Inductor's default mode: the same options for tune and serve."""


@dataclass
class Tuned:
    store_url: str
    ref: str
    record: dict[str, Any]
    compile_cache: dict[str, int]


def _fresh_cache(tmp: Path) -> dict[str, str]:
    """An empty Inductor/Triton cache for one process: nothing compiled earlier can leak into it."""
    tmp.mkdir(parents=True)
    return {"TORCHINDUCTOR_CACHE_DIR": str(tmp / "inductor"), "TRITON_CACHE_DIR": str(tmp / "triton")}


def _tune(target: str, store_url: str, tmp: Path) -> dict[str, Any]:
    argv = [sys.executable, "-m", "vlmforge", "tune", target, "--store", store_url, *RUNNER, "--precompile", "--json",
            "--cache-dir", str(tmp / "engines")]
    done = subprocess.run(argv, env=runner_env(**_fresh_cache(tmp / "cache")), capture_output=True, text=True,
                          cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def tuned(build_workdir: Path, tmp_path_factory: pytest.TempPathFactory) -> Tuned:
    """tiny-llava published to a local store and tuned there by `vlmforge tune` (a cold compile)."""
    from tests.helpers.runners import publish_tiny

    tmp = tmp_path_factory.mktemp("tune")
    url = str(tmp / "store")
    _, outcome = publish_tiny("tiny-llava", build_workdir, url)
    out = _tune(outcome.manifest.ref, url, tmp)
    return Tuned(url, out["ref"], out["record"], out["compile_cache"])


@contextlib.contextmanager
def _serve(engine: Path, store_url: str, tmp: Path) -> Iterator[tuple[dict[str, Any], str]]:
    """A fresh `vlmforge serve` (an empty Inductor cache) warmed up and healthy: its /health, and its log with its
    metrics."""
    log = tmp / "serve.log"
    runner = start_runner(engine, log, args=(*RUNNER, "--warmup", "--tune-store", store_url), timeout=400,
                          env=_fresh_cache(tmp / "cache"))
    try:
        with urllib.request.urlopen(f"{runner.url}/health", timeout=5) as response:
            health = json.loads(response.read())
        with urllib.request.urlopen(f"{runner.url}/metrics", timeout=5) as response:
            metrics = response.read().decode()
        yield health, runner.log_text() + metrics
    finally:
        stop_runner(runner)


def _pulled(store_url: str, ref: str, dest: Path) -> Path:
    with make_store(store_url) as store:
        store.pull(ref, dest)
    return dest


def test_tune_compiles_cold_and_leaves_the_build_as_it_was(tuned: Tuned) -> None:
    with make_store(tuned.store_url) as store:
        manifest = store.resolve(tuned.ref)
        assert [r.model_dump(mode="json") for r in store.tune_records(manifest)] == [tuned.record]
    key = tuned.record["key"]
    assert key["fingerprint"] == manifest.fingerprint and key["device"] == "cpu" and key["compile_mode"] == "default"
    assert key["buckets"] == [[1, 512]] or len(key["buckets"]) == 1
    assert tuned.compile_cache["fxgraph_cache_miss"] > 0 and tuned.compile_cache["fxgraph_cache_hit"] == 0
    assert tuned.record["artifacts"]["precompiled_step"] == 1, tuned  # --precompile: the bucket's step package
    assert all(entry.path != "tune-artifacts.bin" for entry in manifest.files)


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_a_fresh_runner_loads_the_tune_artifact_and_hits_the_compile_cache(
        tuned: Tuned, backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    url, ref = tuned.store_url, tuned.ref
    if backend == "s3":  # the same build and tune artifact in an S3 store (moto)
        import boto3

        request.getfixturevalue("aws_env")
        bucket = f"t-{uuid.uuid4().hex[:12]}"
        boto3.client("s3").create_bucket(Bucket=bucket)
        url = f"s3://{bucket}/engines"
        with make_store(tuned.store_url) as local, make_store(url) as s3:
            manifest = local.resolve(ref)
            engine = _pulled(tuned.store_url, ref, tmp_path / "source")
            (engine / ".vlmforge-manifest.json").unlink()
            s3.publish(engine, manifest.with_files([]))
            record = local.tune_records(manifest)[0]
            s3.publish_tune(manifest, record.key, local.read_tune(record), warmup_seconds=record.warmup_seconds)
    engine = _pulled(url, ref, tmp_path / "engine")
    with _serve(engine, url, tmp_path) as (health, log):
        assert health["warm_start"] is True, log[-3000:]
        # the bucket's step was loaded compiled ahead of time: nothing traced, nothing compiled
        assert health["start"]["precompiled"] == [f"{b}x{n}" for b, n in tuned.record["key"]["buckets"]], log[-3000:]
        assert health["start"]["compile_cache"]["graphs_traced"] == 0, log[-3000:]
        assert health["start"]["compile_cache"]["fxgraph_cache_miss"] == 0
        assert health["warmup_seconds"] > 0
        assert "vlmforge_warm_start 1.0" in log


def _edit_record(store_url: str, ref: str, edit: Any) -> tuple[str, bytes]:
    """Edit the build's tune record in place; (its key, its original bytes) to put back."""
    with make_store(store_url) as store:
        key = store._tune_key(store.tune_records(ref)[0])
        original = store._get(key)[0]
        data = json.loads(original)
        edit(data)
        store._put(key, json.dumps(data).encode())
    return key, original


def test_a_key_mismatch_is_a_warning_and_a_cold_compile(tuned: Tuned, tmp_path: Path) -> None:
    engine = _pulled(tuned.store_url, tuned.ref, tmp_path / "engine")
    key, original = _edit_record(tuned.store_url, tuned.ref, lambda data: data["key"].update(torch="2.11.0+cu130"))
    try:
        with _serve(engine, tuned.store_url, tmp_path) as (health, log):
            assert health["warm_start"] is False
            assert health["start"]["compile_cache"]["fxgraph_cache_miss"] > 0
            assert health["start"]["compile_cache"]["fxgraph_cache_hit"] == 0
            assert "WARNING" in log and "torch: " in log and "2.11.0+cu130 in the artifact" in log
            assert "vlmforge_warm_start 0.0" in log
    finally:
        with make_store(tuned.store_url) as store:
            store._put(key, original)


def test_a_damaged_tune_blob_is_a_warning_and_a_cold_compile(tuned: Tuned, tmp_path: Path) -> None:
    engine = _pulled(tuned.store_url, tuned.ref, tmp_path / "engine")
    with make_store(tuned.store_url) as store:
        record = store.tune_records(tuned.ref)[0]
        good = store._get(blob_key(record.sha256))[0]
        store._put(blob_key(record.sha256), bytes(reversed(good)))
    try:
        with _serve(engine, tuned.store_url, tmp_path) as (health, log):
            assert health["warm_start"] is False and "not used" in health["start"]["reason"]
            assert health["start"]["compile_cache"]["fxgraph_cache_miss"] > 0
            assert "WARNING" in log and record.sha256[:12] in log
    finally:
        with make_store(tuned.store_url) as store:
            store._put(blob_key(record.sha256), good)


def test_an_earlier_artifact_of_compile_caches_alone_still_warms_the_start(tuned: Tuned, tmp_path: Path) -> None:
    """A tune artifact stored before step packages existed (the bare compile caches) still loads: Inductor's cache
    hits, and the step is traced again (nothing precompiled)."""
    from vlmforge.runner.tune import unbundle

    engine = _pulled(tuned.store_url, tuned.ref, tmp_path / "engine")
    with make_store(tuned.store_url) as store:
        manifest = store.resolve(tuned.ref)
        record = store.tune_records(manifest)[0]
        caches, steps = unbundle(store.read_tune(record))
        assert list(steps) == [tuple(b) for b in record.key.buckets]
    url = str(tmp_path / "store")
    with make_store(url) as old:
        pulled = _pulled(tuned.store_url, tuned.ref, tmp_path / "source")
        (pulled / ".vlmforge-manifest.json").unlink()
        old.publish(pulled, manifest.with_files([]))
        old.publish_tune(manifest, record.key, caches, warmup_seconds=record.warmup_seconds)
    engine = _pulled(url, tuned.ref, tmp_path / "engine-old")
    with _serve(engine, url, tmp_path) as (health, log):
        assert health["warm_start"] is True and health["start"]["precompiled"] == [], log[-3000:]
        assert health["start"]["compile_cache"]["graphs_traced"] == 1
        assert health["start"]["compile_cache"]["fxgraph_cache_hit"] > 0
        assert health["start"]["compile_cache"]["fxgraph_cache_miss"] == 0
