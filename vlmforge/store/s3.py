"""S3 backend of the artifact store (AWS, MinIO, moto): conditional writes for CAS, multipart and ranged transfers."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import boto3
import botocore.exceptions as bce
import urllib3.exceptions
from botocore.config import Config

from vlmforge.artifacts.manifest import FileEntry
from vlmforge.errors import IntegrityError, NotFound, StoreError
from vlmforge.store.backend import PreconditionFailed
from vlmforge.store.base import ArtifactStore
from vlmforge.store.keys import blob_key
from vlmforge.store.records import IncompleteUpload, ObjectInfo
from vlmforge.store.transfer import (
    OrderedHasher,
    ProgressSink,
    RangedCopy,
    TaskGroup,
    TransferSettings,
    plan_parts,
    retry,
)

logger = logging.getLogger(__name__)

_RETRY_CODES = {"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "RequestTimeTooSkewed"}
_AUTH_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"}


class ShortTransfer(Exception):
    """A response body ended before the expected number of bytes (retryable)."""


def _code(exc: bce.ClientError) -> tuple[str, int]:
    error = exc.response.get("Error", {})
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return str(error.get("Code", "")), int(status or 0)


def is_retryable(exc: BaseException) -> bool:
    """Whether an S3 call failed transiently (5xx, throttling, connection reset, timeout, short body)."""
    if isinstance(exc, bce.ClientError):
        code, status = _code(exc)
        return status >= 500 or status in (408, 429) or code in _RETRY_CODES
    return isinstance(
        exc,
        (
            bce.ConnectionError,
            bce.HTTPClientError,
            bce.ResponseStreamingError,
            bce.IncompleteReadError,
            urllib3.exceptions.HTTPError,
            ConnectionError,
            TimeoutError,
            ShortTransfer,
        ),
    )


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


class S3Store(ArtifactStore):
    """An artifact store under ``s3://bucket/prefix`` on any S3-compatible endpoint.

    Credentials come from the standard AWS chain; the endpoint from ``endpoint_url`` or
    ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (custom endpoints use path-style addressing).
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        settings: TransferSettings | None = None,
        **kwargs: Any,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        super().__init__(f"s3://{bucket}/{self.prefix}".rstrip("/"), settings, **kwargs)
        self.endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        config = Config(
            max_pool_connections=self.settings.workers + 8,
            retries={"mode": "standard", "max_attempts": self.settings.attempts},
            connect_timeout=10,
            read_timeout=120,
            tcp_keepalive=True,
            s3={"addressing_style": "path" if self.endpoint_url else "auto", "payload_signing_enabled": False},
            request_checksum_calculation="when_supported",
            response_checksum_validation="when_required",
        )
        try:
            self.client = boto3.session.Session().client("s3", endpoint_url=self.endpoint_url, config=config)
        except bce.BotoCoreError as exc:
            raise StoreError(f"cannot set up the S3 client for {self.url}: {exc}") from None

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _unkey(self, key: str) -> str:
        return key[len(self.prefix) + 1 :] if self.prefix else key

    def close(self) -> None:
        """Close the HTTP connection pool."""
        self.client.close()

    @contextmanager
    def _backend_errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except bce.ClientError as exc:
            code, status = _code(exc)
            message = exc.response.get("Error", {}).get("Message", "")
            if code == "NoSuchBucket":
                raise StoreError(f"bucket {self.bucket!r} does not exist at {self.endpoint_url or 'AWS'}") from None
            if code in _AUTH_CODES or status == 403:
                raise StoreError(
                    f"access to {self.url} denied ({code or status}); check the AWS credentials and permissions"
                ) from None
            raise StoreError(f"S3 {what} on {self.url} failed: {code or status} {message}".rstrip()) from exc
        except bce.NoCredentialsError:
            raise StoreError(
                f"no AWS credentials for {self.url}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE"
                " or an instance role"
            ) from None
        except bce.EndpointConnectionError as exc:
            raise StoreError(f"cannot reach the S3 endpoint for {self.url}: {exc}") from None
        except (bce.BotoCoreError, urllib3.exceptions.HTTPError, ConnectionError, TimeoutError, ShortTransfer) as exc:
            raise StoreError(f"S3 {what} on {self.url} failed: {type(exc).__name__}: {exc}") from exc

    # ---- small objects -------------------------------------------------------------------

    def _get(self, key: str) -> tuple[bytes, str]:
        with self._backend_errors(f"read of {key}"):
            try:
                response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
                return response["Body"].read(), response["ETag"]
            except bce.ClientError as exc:
                if _code(exc)[0] in ("NoSuchKey", "404"):
                    raise NotFound(f"{key} not found in {self.url}") from None
                raise

    def _put(self, key: str, data: bytes, *, if_absent: bool = False, if_version: str | None = None) -> None:
        conditions: dict[str, str] = {}
        if if_absent:
            conditions["IfNoneMatch"] = "*"
        if if_version is not None:
            conditions["IfMatch"] = if_version
        with self._backend_errors(f"write of {key}"):
            try:
                self.client.put_object(
                    Bucket=self.bucket, Key=self._key(key), Body=data, ContentType="application/json", **conditions
                )
            except bce.ClientError as exc:
                code, status = _code(exc)
                if status in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict"):
                    raise PreconditionFailed(key) from None
                if if_version is not None and code in ("NoSuchKey", "404"):
                    raise PreconditionFailed(key) from None
                raise

    def _size(self, key: str) -> int | None:
        with self._backend_errors(f"HEAD of {key}"):
            try:
                return int(self.client.head_object(Bucket=self.bucket, Key=self._key(key))["ContentLength"])
            except bce.ClientError as exc:
                if _code(exc)[1] == 404 or _code(exc)[0] in ("NoSuchKey", "404", "NotFound"):
                    return None
                raise

    def _list(self, prefix: str) -> Iterator[ObjectInfo]:
        with self._backend_errors(f"listing of {prefix}"):
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._key(prefix))
            for page in pages:
                for obj in page.get("Contents", []):
                    yield ObjectInfo(key=self._unkey(obj["Key"]), size=obj["Size"], modified=obj["LastModified"])

    def _children(self, prefix: str) -> list[str]:
        names = []
        with self._backend_errors(f"listing of {prefix}"):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self._key(prefix), Delimiter="/"
            )
            for page in pages:
                for common in page.get("CommonPrefixes", []):
                    names.append(self._unkey(common["Prefix"])[len(prefix) :].rstrip("/"))
        return sorted(names)

    def _entries(self, prefix: str) -> list[str]:
        names = []
        with self._backend_errors(f"listing of {prefix or 'the store root'}"):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self._key(prefix), Delimiter="/"
            )
            for page in pages:
                names += [self._unkey(obj["Key"])[len(prefix) :] for obj in page.get("Contents", [])]
                names += [self._unkey(common["Prefix"])[len(prefix) :] for common in page.get("CommonPrefixes", [])]
        return sorted(names)

    def _delete(self, key: str) -> None:
        with self._backend_errors(f"delete of {key}"):
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def _delete_many(self, keys: Sequence[str]) -> None:
        with self._backend_errors("batch delete"):
            for start in range(0, len(keys), 1000):
                batch = [{"Key": self._key(k)} for k in keys[start : start + 1000]]
                response = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
                errors = response.get("Errors", [])
                if errors:
                    first = errors[0]
                    raise StoreError(f"could not delete {len(errors)} objects, e.g. {first['Key']}: {first['Code']}")

    # ---- blobs ---------------------------------------------------------------------------

    def _retry(self, fn: Callable[[], Any], what: str) -> Any:
        return retry(fn, self.settings, what=what, retryable=is_retryable)

    def _schedule_upload(
        self, source: Path, entry: FileEntry, group: TaskGroup, sink: ProgressSink, *, verify: bool
    ) -> Callable[[], None] | None:
        key = self._key(blob_key(entry.sha256))
        if entry.size < self.settings.multipart_threshold:
            group.submit(self._put_blob, source, key, entry, sink, verify)
            return None
        upload = _MultipartUpload(self, source, key, entry, verify)
        group.submit(upload.start, group, sink)
        return upload.abort

    def _put_blob(self, source: Path, key: str, entry: FileEntry, sink: ProgressSink, verify: bool) -> None:
        data = source.read_bytes()
        if len(data) != entry.size or (verify and hashlib.sha256(data).hexdigest() != entry.sha256):
            raise IntegrityError(f"{source} changed while being published (size or sha256 differs from the manifest)")
        self._retry(
            lambda: self.client.put_object(
                Bucket=self.bucket, Key=key, Body=data, Metadata={"sha256": entry.sha256}
            ),
            f"upload of {source}",
        )
        sink.advance(len(data))

    def _schedule_download(
        self, entry: FileEntry, dest: Path, group: TaskGroup, sink: ProgressSink, on_done: Callable[[], None]
    ) -> None:
        key = self._key(blob_key(entry.sha256))
        chunk = self.settings.io_chunk

        def fetch(fd: int, offset: int, length: int, progress: ProgressSink) -> None:
            extra = {} if (offset == 0 and length == entry.size) else {"Range": f"bytes={offset}-{offset + length - 1}"}
            try:
                response = self.client.get_object(Bucket=self.bucket, Key=key, **extra)
            except bce.ClientError as exc:
                if _code(exc)[0] in ("NoSuchKey", "404"):
                    raise IntegrityError(f"blob {entry.sha256} of {entry.path} is missing from {self.url}") from None
                raise
            body = response["Body"]
            pos = offset
            try:
                for data in body.iter_chunks(chunk):
                    _pwrite_all(fd, data, pos)
                    pos += len(data)
                    progress.advance(len(data))
            finally:
                body.close()
            if pos != offset + length:
                raise ShortTransfer(f"got {pos - offset} of {length} bytes")

        RangedCopy(
            dest, entry, fetch, self.settings,
            what=f"blob {entry.sha256[:12]} of {entry.path}", on_done=on_done, retryable=is_retryable,
        ).schedule(group, sink)

    def _list_incomplete(self, started_before: datetime) -> list[IncompleteUpload]:
        found = []
        with self._backend_errors("listing of incomplete uploads"):
            pages = self.client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=self._key("blobs/")
            )
            for page in pages:
                for upload in page.get("Uploads", []):
                    if upload["Initiated"] < started_before:
                        found.append(IncompleteUpload(kind="multipart upload", key=self._unkey(upload["Key"]),
                                                      started=upload["Initiated"], upload_id=upload["UploadId"]))
        return found

    def _remove_incomplete(self, items: Sequence[IncompleteUpload]) -> int:
        with self._backend_errors("cleanup of incomplete uploads"):
            for item in items:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=self._key(item.key), UploadId=item.upload_id)
        return len(items)


class _MultipartUpload:
    """One blob uploaded as parallel parts; completed only after every part is in and the sha256 checks."""

    def __init__(self, store: S3Store, source: Path, key: str, entry: FileEntry, verify: bool) -> None:
        self.store = store
        self.source = source
        self.key = key
        self.entry = entry
        self.parts = plan_parts(entry.size, store.settings)
        self.hasher = OrderedHasher(source, self.parts, store.settings.io_chunk) if verify else None
        self.completed: dict[int, dict[str, Any]] = {}
        self.upload_id: str | None = None
        self.remaining = len(self.parts)
        self.finished = False
        self.lock = threading.Lock()

    @property
    def client(self) -> Any:
        return self.store.client

    def start(self, group: TaskGroup, sink: ProgressSink) -> None:
        response = self.store._retry(
            lambda: self.client.create_multipart_upload(
                Bucket=self.store.bucket,
                Key=self.key,
                Metadata={"sha256": self.entry.sha256},
                ChecksumAlgorithm="CRC32",
            ),
            f"start of multipart upload of {self.source}",
        )
        self.upload_id = response["UploadId"]
        for index in range(len(self.parts)):
            group.submit(self.part, index, group, sink)

    def part(self, index: int, group: TaskGroup, sink: ProgressSink) -> None:
        if group.failed:
            return
        offset, length = self.parts[index]
        fd = os.open(self.source, os.O_RDONLY)
        try:
            data = os.pread(fd, length, offset)
        finally:
            os.close(fd)
        if len(data) != length:
            raise IntegrityError(f"{self.source} changed while being published (it shrank)")
        response = self.store._retry(
            lambda: self.client.upload_part(
                Bucket=self.store.bucket, Key=self.key, UploadId=self.upload_id, PartNumber=index + 1, Body=data,
                ChecksumAlgorithm="CRC32",
            ),
            f"upload of {self.source} part {index + 1}/{len(self.parts)}",
        )
        sink.advance(length)
        if self.hasher is not None:
            self.hasher.mark_done(index)
        with self.lock:
            self.completed[index + 1] = {"ETag": response["ETag"], "PartNumber": index + 1}
            if "ChecksumCRC32" in response:
                self.completed[index + 1]["ChecksumCRC32"] = response["ChecksumCRC32"]
            self.remaining -= 1
            last = self.remaining == 0
        if last:
            self.complete()

    def complete(self) -> None:
        if self.hasher is not None and self.hasher.hexdigest() != self.entry.sha256:
            raise IntegrityError(f"{self.source} changed while being published: its sha256 differs from the manifest")
        parts = [part for _, part in sorted(self.completed.items())]

        def finish() -> None:
            try:
                self.client.complete_multipart_upload(
                    Bucket=self.store.bucket, Key=self.key, UploadId=self.upload_id, MultipartUpload={"Parts": parts}
                )
            except bce.ClientError as exc:
                # A retry after a lost response finds the upload already completed.
                if _code(exc)[0] != "NoSuchUpload" or self.store._size(blob_key(self.entry.sha256)) != self.entry.size:
                    raise

        self.store._retry(finish, f"completion of multipart upload of {self.source}")
        with self.lock:
            self.finished = True

    def abort(self) -> None:
        """Best-effort abort after a failure, so no incomplete upload lingers (gc also cleans them)."""
        with self.lock:
            if self.finished or self.upload_id is None:
                return
            self.finished = True
        try:
            self.client.abort_multipart_upload(Bucket=self.store.bucket, Key=self.key, UploadId=self.upload_id)
        except Exception as exc:  # noqa: BLE001 - cleanup must not mask the original failure
            logger.warning("could not abort multipart upload of %s: %s", self.source, exc)
