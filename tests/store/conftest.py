"""Fixtures for the store tests: a real moto S3 server, a fault proxy, and the same suite on both backends."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from faultproxy import FaultProxy

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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def moto_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Start ``moto_server`` on a free loopback port for the whole session."""
    workdir = tmp_path_factory.mktemp("moto")
    port = _free_port()
    env = {**os.environ, "S3_UPLOAD_PART_MIN_SIZE": str(64 * KiB), "MOTO_S3_DEFAULT_KEY_BUFFER_SIZE": str(64 << 20)}
    log = (workdir / "moto.log").open("wb")
    server = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)], cwd=workdir, stdout=log,
                            stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited: {(workdir / 'moto.log').read_text()}")
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("moto_server did not start within 30 s") from None
            time.sleep(0.1)
    yield url
    proc.terminate()
    proc.wait(10)
    log.close()


@pytest.fixture(scope="session")
def aws_env(moto_url: str) -> Iterator[str]:
    """Fake credentials and AWS_ENDPOINT_URL pointing at moto, for the whole session."""
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(name, raising=False)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_ENDPOINT_URL", moto_url)
        mp.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        yield moto_url


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
