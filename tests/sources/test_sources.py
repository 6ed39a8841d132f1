"""Sources: local directories, S3 (real moto server), the Hugging Face cache offline; verification."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from vlmforge.errors import SourceError, SourceMoved
from vlmforge.sources import open_source
from vlmforge.sources.base import CHECKSUM_FILE


def fake_checkpoint(root: Path, payload: bytes = b"\x00" * 64) -> Path:
    """A structurally valid checkpoint: config.json and a real safetensors file."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({"model_type": "llava"}))
    header = json.dumps({"w": {"dtype": "F32", "shape": [len(payload) // 4], "data_offsets": [0, len(payload)]}}).encode()
    (root / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + payload)
    return root

@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A real Hugging Face cache layout (org/tiny, main -> one commit) with the hub offline; the commit."""
    import importlib

    import huggingface_hub.constants as constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--org--tiny"
    fake_checkpoint(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    importlib.reload(constants)
    try:
        yield commit
    finally:
        monkeypatch.undo()
        importlib.reload(constants)


def test_local_source_is_content_addressed(tmp_path: Path) -> None:
    src = fake_checkpoint(tmp_path / "ckpt")
    source = open_source(f"file://{src}")
    revision = source.resolve_revision()
    fetched = source.fetch(tmp_path / "dest")
    assert fetched.revision == revision and revision.startswith("sha256:")
    assert {f.path for f in fetched.files} == {"config.json", "model.safetensors"}
    fake_checkpoint(src, b"\x01" * 64)
    assert open_source(str(src)).resolve_revision() != revision


def test_truncated_weights_are_detected(tmp_path: Path) -> None:
    src = fake_checkpoint(tmp_path / "ckpt")
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[:-10])
    with pytest.raises(SourceError, match="corrupt weights model.safetensors: the header describes"):
        open_source(str(src)).fetch(tmp_path / "dest")


def test_checksum_file_catches_altered_bytes(tmp_path: Path) -> None:
    src = fake_checkpoint(tmp_path / "ckpt")
    digest = hashlib.sha256((src / "model.safetensors").read_bytes()).hexdigest()
    (src / CHECKSUM_FILE).write_text(f"{digest}  model.safetensors\n")
    open_source(str(src)).fetch(tmp_path / "ok")
    fake_checkpoint(src, b"\x07" * 64)  # same size, other bytes
    with pytest.raises(SourceError, match="corrupt file model.safetensors: sha256"):
        open_source(str(src)).fetch(tmp_path / "bad")


def test_missing_directory_and_config(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="source directory not found"):
        open_source(str(tmp_path / "nope")).resolve_revision()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.txt").write_text("x")
    with pytest.raises(SourceError, match="no config.json"):
        open_source(str(tmp_path / "empty")).fetch(tmp_path / "dest")


def test_hf_source_offline_from_the_cache(offline_hub: str, tmp_path: Path) -> None:
    """A real Hugging Face cache layout, read with the hub offline: the revision is the snapshot's commit."""
    commit = offline_hub
    source = open_source("hf://org/tiny@main")
    assert source.resolve_revision() == commit
    fetched = source.fetch(tmp_path / "dest")
    assert fetched.revision == commit and (tmp_path / "dest" / "model.safetensors").is_file()
    with pytest.raises(SourceError, match="not in the Hugging Face cache"):
        open_source("hf://org/other").resolve_revision()


def test_an_unreachable_hub_is_a_source_error_of_that_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub that does not answer (here: an endpoint where nothing listens) is one model's SourceError, which the
    watch reports in that model's row, with the network error kept as its cause (so the task retries it)."""
    import importlib
    import socket

    import huggingface_hub.constants as constants

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "2")
    importlib.reload(constants)
    try:
        with pytest.raises(SourceError, match="did not answer for org/tiny@main") as caught:
            open_source("hf://org/tiny").resolve_revision()
        assert caught.value.__cause__ is not None
        from vlmforge_tasks.common import is_transient

        assert is_transient(caught.value)
    finally:
        monkeypatch.undo()
        importlib.reload(constants)


def test_tiny_sources_include_every_tiny_model_of_a_family(tmp_path: Path) -> None:
    """tiny://vila1.0 is VILA's second tiny model (the VILA 1.0 layout): resolved and fetched like the first."""
    pytest.importorskip("torch")
    source = open_source("tiny://vila1.0")
    fetched = source.fetch(tmp_path / "v10")
    assert fetched.revision == source.resolve_revision() and fetched.revision.startswith("tiny-sha256:")
    files = {f.path for f in fetched.files}
    assert {"config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors"} <= files
    assert not any("/" in path for path in files)  # one folder
    assert open_source("tiny://vila").resolve_revision() != fetched.revision
    with pytest.raises(SourceError, match=r"no family makes tiny://vila2\.0; tiny sources: .*tiny://vila, tiny://vila1\.0"):
        open_source("tiny://vila2.0").resolve_revision()


def test_a_local_fetch_reads_each_source_byte_once(tmp_path: Path) -> None:
    """The fetch stage hashed a local checkpoint four times (resolving the revision, before the copy, after it, and
    for the stage record): with the build's digests shared, the hard-linked copy and the record reuse the first."""
    from vlmforge.build.pipeline import HfPipeline
    from vlmforge.build.workdir import Workdir
    from vlmforge.families import get_family
    from vlmforge.specs.schema import spec_from_dict

    source = tmp_path / "checkpoint"
    get_family("llava").make_tiny(source)
    total = sum(p.stat().st_size for p in source.rglob("*") if p.is_file())
    spec = spec_from_dict({"name": "local-llava", "family": "llava", "source": f"file://{source}",
                           "limits": {"max_batch_size": 1, "max_input_len": 128, "max_output_len": 32},
                           "architecture": {"num_visual_features": 16}})
    work = Workdir(tmp_path / "work")
    fetched = HfPipeline(spec, work, device="cpu", on_event=lambda line: None).fetch()
    assert sum(entry.size for entry in fetched.record.files) == total
    assert work.digests.hashed_bytes == total and work.digests.reused_bytes >= 3 * total


def test_a_file_changed_in_place_is_read_again(tmp_path: Path) -> None:
    from vlmforge.sources import DigestCache

    path = tmp_path / "weights.bin"
    path.write_bytes(b"a" * 1000)
    cache = DigestCache()
    first, _ = cache.sha256(path)
    assert cache.sha256(path)[0] == first and cache.reused_bytes == 1000
    link = tmp_path / "link.bin"
    link.hardlink_to(path)  # the same file under another name: not read again
    assert cache.sha256(link)[0] == first and cache.hashed_bytes == 1000
    stat = path.stat()
    path.write_bytes(b"b" * 1000)  # same size; a new modification time
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert cache.sha256(path)[0] == hashlib.sha256(b"b" * 1000).hexdigest() and cache.hashed_bytes == 2000


def test_hash_tree_in_parallel_matches_one_file_at_a_time(tmp_path: Path) -> None:
    from vlmforge.sources.base import hash_tree, sha256_file

    for i in range(20):
        (tmp_path / f"d{i % 3}").mkdir(exist_ok=True)
        (tmp_path / f"d{i % 3}" / f"f{i}.bin").write_bytes(bytes([i]) * (i * 100_003))
    entries = hash_tree(tmp_path)
    assert [e.path for e in entries] == sorted(e.path for e in entries) and len(entries) == 20
    assert all(e.sha256 == sha256_file(tmp_path / e.path) and e.size == (tmp_path / e.path).stat().st_size
               for e in entries)


# --- a fetch is pinned to the revision the build resolved (its stage key) -------------------------------------------


def test_a_local_fetch_of_a_revision_the_directory_no_longer_holds_is_refused(tmp_path: Path) -> None:
    src = fake_checkpoint(tmp_path / "ckpt")
    source = open_source(f"file://{src}")
    resolved = source.resolve_revision()
    fake_checkpoint(src, b"\x01" * 64)  # moved on after it was resolved
    with pytest.raises(SourceMoved, match="moved on since its revision was resolved"):
        open_source(f"file://{src}").fetch(tmp_path / "dest", revision=resolved)
    current = open_source(f"file://{src}").resolve_revision()
    assert open_source(f"file://{src}").fetch(tmp_path / "dest2", revision=current).revision == current


def test_an_offline_hf_fetch_of_another_commit_is_refused(offline_hub: str, tmp_path: Path) -> None:
    commit = offline_hub
    with pytest.raises(SourceMoved):
        open_source("hf://org/tiny@main").fetch(tmp_path / "dest", revision="f" * 40)
    assert open_source("hf://org/tiny@main").fetch(tmp_path / "dest", revision=commit).revision == commit


@pytest.fixture
def s3_checkpoint(aws_env: str, tmp_path: Path) -> str:
    import uuid

    import boto3

    from tests.helpers.checkpoints import upload

    bucket = f"src-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    upload(fake_checkpoint(tmp_path / "ckpt"), bucket, "model")
    return f"s3://{bucket}/model"


def test_an_s3_fetch_of_a_listing_that_changed_since_it_was_resolved_is_refused(s3_checkpoint: str,
                                                                                 tmp_path: Path) -> None:
    from tests.helpers.checkpoints import upload

    resolved = open_source(s3_checkpoint).resolve_revision()
    bucket = s3_checkpoint.removeprefix("s3://").split("/")[0]
    upload(fake_checkpoint(tmp_path / "v2", b"\x02" * 64), bucket, "model")
    with pytest.raises(SourceMoved):
        open_source(s3_checkpoint).fetch(tmp_path / "dest", revision=resolved)


def test_an_s3_object_replaced_during_the_download_is_caught(s3_checkpoint: str, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Same size, so the size check passes: only the listing after the download shows it."""
    import boto3

    from vlmforge.sources import s3 as s3_source

    bucket = s3_checkpoint.removeprefix("s3://").split("/")[0]
    resolved = open_source(s3_checkpoint).resolve_revision()
    real_client = s3_source.s3_client

    def client_that_races():  # noqa: ANN202 - a real client; another writer replaces an object mid-download
        client = real_client()
        download = client.download_file

        def racing_download(bucket_name: str, key: str, filename: str, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            download(bucket_name, key, filename, *args, **kwargs)
            if key.endswith("config.json"):
                body = json.dumps({"model_type": "llavA"}).encode()  # same length, other bytes
                boto3.client("s3").put_object(Bucket=bucket, Key="model/config.json", Body=body)

        client.download_file = racing_download
        return client

    monkeypatch.setattr(s3_source, "s3_client", client_that_races)
    with pytest.raises(SourceMoved):
        open_source(s3_checkpoint).fetch(tmp_path / "dest", revision=resolved)


def test_an_s3_fetch_reads_each_byte_once_and_still_checks_the_etag(s3_checkpoint: str, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from vlmforge.sources import s3 as s3_source
    from vlmforge.sources.base import DigestCache

    digests = DigestCache()
    fetched = open_source(s3_checkpoint, digests=digests).fetch(tmp_path / "dest")
    total = sum(entry.size for entry in fetched.files)
    assert digests.hashed_bytes == total and digests.reused_bytes == total  # the MD5 read gave the sha256 too

    real_client = s3_source.s3_client

    def client_that_corrupts():  # noqa: ANN202 - a real client; the bytes on disk go bad after the transfer
        client = real_client()
        download = client.download_file

        def corrupting_download(bucket_name: str, key: str, filename: str, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            download(bucket_name, key, filename, *args, **kwargs)
            if key.endswith("model.safetensors"):
                data = bytearray(Path(filename).read_bytes())
                data[-1] ^= 0xFF
                Path(filename).write_bytes(bytes(data))

        client.download_file = corrupting_download
        return client

    monkeypatch.setattr(s3_source, "s3_client", client_that_corrupts)
    with pytest.raises(SourceError, match="does not match ETag"):
        open_source(s3_checkpoint).fetch(tmp_path / "dest2")
