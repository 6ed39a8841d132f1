"""Fixtures for the store tests: a bucket on the moto S3 server (tests/conftest.py), a fault proxy, and the same
suite on both backends."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
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


def make_store(url: str, settings: TransferSettings = SETTINGS, endpoint_url: str | None = None) -> ArtifactStore:
    """Open ``url`` with the small test settings and short lock waits."""
    if url.startswith("s3://"):
        bucket, _, prefix = url[5:].partition("/")
        return S3Store(bucket, prefix, settings=settings, endpoint_url=endpoint_url, lock_wait=0.5)
    return LocalStore(Path(url), settings=settings, lock_wait=0.5)


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
