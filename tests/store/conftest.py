"""Fixtures for the store tests: a bucket on the moto S3 server (tests/conftest.py), a fault proxy, and the same
suite on both backends."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import boto3
import pytest

from tests.helpers.faultproxy import FaultProxy
from vlmforge.store import ArtifactStore, LocalStore, TransferSettings
from vlmforge.store.s3 import S3Store

KiB = 1024

# Small parts so multipart and ranged paths are exercised with small files (moto is told to accept them).
SETTINGS = TransferSettings(
    workers=4,
    part_size=256 * KiB,
    download_part_size=256 * KiB,
    max_download_part_size=256 * KiB,
    min_part_size=64 * KiB,
    multipart_threshold=512 * KiB,
    io_chunk=64 * KiB,
    attempts=3,
    backoff=0.01,
)


@pytest.fixture()
def bucket(aws_env: str) -> str:
    """A fresh, empty bucket on the moto server."""
    name = f"t-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture(params=["local", "s3"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """URL of an empty store on each backend."""
    if request.param == "local":
        return str(tmp_path / "store")
    return f"s3://{request.getfixturevalue('bucket')}/engines"


def make_store(url: str, settings: TransferSettings = SETTINGS, endpoint_url: str | None = None,
               gc_grace: timedelta = timedelta(0), **kwargs: object) -> ArtifactStore:
    """Open ``url`` with the small test settings, short lock waits and no gc grace period (tests that are about
    the grace period pass one)."""
    options = {"lock_wait": 0.5, "gc_grace": gc_grace, **kwargs}
    if url.startswith("s3://"):
        bucket, _, prefix = url[5:].partition("/")
        return S3Store(bucket, prefix, settings=settings, endpoint_url=endpoint_url, **options)  # type: ignore[arg-type]
    return LocalStore(Path(url), settings=settings, **options)  # type: ignore[arg-type]


@pytest.fixture()
def store(store_url: str) -> Iterator[ArtifactStore]:
    """An empty store, once per backend."""
    with make_store(store_url) as opened:
        yield opened


@pytest.fixture()
def proxy(moto_url: str) -> Iterator[FaultProxy]:
    """A fault-injecting proxy in front of moto."""
    host, port = moto_url.removeprefix("http://").split(":")
    fault_proxy = FaultProxy(host, int(port))
    yield fault_proxy
    fault_proxy.close()


@pytest.fixture()
def faulty_store(bucket: str, proxy: FaultProxy) -> Iterator[ArtifactStore]:
    """An S3 store reached through the fault proxy."""
    with make_store(f"s3://{bucket}/engines", endpoint_url=proxy.url) as opened:
        yield opened


def put_raw(url: str, key: str, data: bytes) -> None:
    """Write an object at ``key`` under a store location behind the store's back (foreign data, damage)."""
    if url.startswith("s3://"):
        bucket, _, prefix = url[5:].partition("/")
        boto3.client("s3").put_object(Bucket=bucket, Key=f"{prefix}/{key}" if prefix else key, Body=data)
        return
    path = Path(url) / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def raw_keys(url: str) -> set[str]:
    """Every object key under a store location, read behind the store's back."""
    if url.startswith("s3://"):
        bucket, _, prefix = url[5:].partition("/")
        pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/")
        return {obj["Key"][len(prefix) + 1 :] for page in pages for obj in page.get("Contents", [])}
    root = Path(url)
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} if root.exists() else set()


def leave_incomplete_upload(url: str, sha256: str) -> str:
    """Leave what an upload killed midway leaves (S3: a multipart upload; local: a scratch file); its key."""
    if url.startswith("s3://"):
        bucket, _, prefix = url[5:].partition("/")
        key = f"blobs/sha256/{sha256[:2]}/{sha256}"
        boto3.client("s3").create_multipart_upload(Bucket=bucket, Key=f"{prefix}/{key}")
        return key
    key = f".vlmforge-scratch/{sha256[:32]}.tmp"
    put_raw(url, key, b"partial")
    return key


def incomplete_uploads(url: str) -> list[str]:
    """Keys of upload leftovers still present (S3: multipart uploads; local: scratch files)."""
    if url.startswith("s3://"):
        bucket, _, prefix = url[5:].partition("/")
        uploads = boto3.client("s3").list_multipart_uploads(Bucket=bucket, Prefix=f"{prefix}/").get("Uploads", [])
        return sorted(u["Key"][len(prefix) + 1 :] for u in uploads)
    return sorted(k for k in raw_keys(url) if k.startswith(".vlmforge-scratch/"))
