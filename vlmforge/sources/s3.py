"""s3:// sources: every object under a prefix, verified against its ETag, revision = digest of the ETags."""

from __future__ import annotations

import hashlib
from pathlib import Path, PurePosixPath

from vlmforge.errors import SourceError
from vlmforge.sources.base import FetchedSource, Source


def s3_client():  # noqa: ANN201 - boto3 client types are generated
    """A boto3 S3 client from the standard AWS chain (endpoint from AWS_ENDPOINT_URL)."""
    import boto3
    from botocore.config import Config

    return boto3.client("s3", config=Config(retries={"max_attempts": 5, "mode": "standard"}, max_pool_connections=32))


class S3Source(Source):
    """A checkpoint stored as objects under s3://bucket/prefix/."""

    @property
    def bucket(self) -> str:
        return self.uri.location.split("/", 1)[0]

    @property
    def prefix(self) -> str:
        parts = self.uri.location.split("/", 1)
        return (parts[1].rstrip("/") + "/") if len(parts) > 1 and parts[1] else ""

    def _objects(self, client) -> list[dict]:  # noqa: ANN001
        from botocore.exceptions import BotoCoreError, ClientError

        objects = []
        try:
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix):
                objects += [obj for obj in page.get("Contents", []) if not obj["Key"].endswith("/")]
        except (ClientError, BotoCoreError) as exc:
            raise SourceError(f"cannot list {self.uri}: {exc}") from None
        if not objects:
            raise SourceError(f"no objects under {self.uri}")
        return sorted(objects, key=lambda obj: obj["Key"])

    def _revision(self, objects: list[dict]) -> str:
        lines = "".join(f"{obj['Key'][len(self.prefix):]}  {obj['ETag'].strip(chr(34))}  {obj['Size']}\n" for obj in objects)
        return "etag:" + hashlib.sha256(lines.encode()).hexdigest()

    def resolve_revision(self) -> str:
        return self._revision(self._objects(s3_client()))

    def fetch(self, dest: Path, revision: str | None = None) -> FetchedSource:
        from botocore.exceptions import BotoCoreError, ClientError

        client = s3_client()
        objects = self._objects(client)
        self._check_pinned(revision, self._revision(objects))
        for obj in objects:
            rel = obj["Key"][len(self.prefix):]
            if rel.startswith("/") or ".." in PurePosixPath(rel).parts:
                raise SourceError(f"refusing object key {obj['Key']!r}: it would escape the download directory")
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                client.download_file(self.bucket, obj["Key"], str(target))
            except (ClientError, BotoCoreError) as exc:
                raise SourceError(f"cannot download s3://{self.bucket}/{obj['Key']}: {exc}") from None
            size = target.stat().st_size
            if size != obj["Size"]:
                raise SourceError(f"corrupt download {rel}: {size} bytes, the bucket lists {obj['Size']}")
            etag = obj["ETag"].strip('"')
            if "-" not in etag:  # single-part uploads: the ETag is the MD5 of the content; the one read of the
                md5 = hashlib.md5(usedforsecurity=False)  # file also gives _finish its sha256 (the build's digests)
                self.digests.sha256(target, also=md5)
                if md5.hexdigest() != etag:
                    raise SourceError(f"corrupt download {rel}: MD5 {md5.hexdigest()} does not match ETag {etag}")
        # a multipart object overwritten with one of the same size during the download passes the size check and
        # has no MD5 ETag: the listing after the download must still be the one downloaded
        self._check_pinned(self._revision(objects), self._revision(self._objects(client)))
        return self._finish(dest, self._revision(objects))
