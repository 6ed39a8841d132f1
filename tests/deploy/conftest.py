"""Deploy test fixtures: an empty store on each backend (local, and S3 on the moto server of tests/conftest.py)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest


@pytest.fixture(params=["local", "s3"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """URL of an empty store on each backend."""
    if request.param == "local":
        yield str(tmp_path / "store")
        return
    request.getfixturevalue("aws_env")
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    yield f"s3://{bucket}/engines"
