"""S3 (and S3-compatible) object storage through boto3.

The endpoint, region and credentials come from the usual AWS environment and config files;
``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` select an S3-compatible server (MinIO, moto,
...) natively in boto3 >= 1.28.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Any, NoReturn

import boto3
import botocore.exceptions
import botocore.loaders
import botocore.session
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

from safelora_ray.core.errors import ChangedError, NotFoundError, StorageError
from safelora_ray.core.validate import env_number
from safelora_ray.storage.base import DEFAULT_MAX_READ_BYTES, ObjectInfo, Storage
from safelora_ray.storage.localfs import as_byte_view, check_range
from safelora_ray.storage.s3_outage import ride_out_outages
from safelora_ray.storage.uri import normalize_relpath

logger = logging.getLogger(__name__)

#: Reads larger than this are split into parallel ranged GETs.
DEFAULT_PART_SIZE = 16 * 1024 * 1024
#: Ranged GETs in flight for one :meth:`S3Storage.read_into`.
DEFAULT_MAX_CONCURRENCY = 8
#: Multipart threshold and part size for uploads.
UPLOAD_PART_SIZE = 64 * 1024 * 1024
#: Chunk size when streaming a response body into a buffer.
_STREAM_CHUNK = 1024 * 1024
#: Attempts at re-reading a range whose body stream broke mid-way (botocore retries only the
#: request, not the streaming of its body).
_BODY_ATTEMPTS = 3

_NOT_FOUND_CODES = {"404", "NoSuchKey", "NotFound"}
_DENIED_CODES = {"403", "AccessDenied", "Forbidden", "AllAccessDisabled"}
_BODY_ERRORS = (
    botocore.exceptions.ResponseStreamingError,
    botocore.exceptions.IncompleteReadError,
    botocore.exceptions.ReadTimeoutError,
    botocore.exceptions.ConnectionClosedError,
)


_loader_lock = threading.Lock()
_loader: Any = None


def _retries() -> dict[str, Any]:
    """botocore's retry settings: ``standard`` mode, 10 retries, unless the user set the usual
    ``AWS_RETRY_MODE`` / ``AWS_MAX_ATTEMPTS`` (a config passed to a client overrides them, so
    they are read here)."""
    mode = os.environ.get("AWS_RETRY_MODE", "").strip() or "standard"
    if mode not in ("standard", "adaptive", "legacy"):
        raise StorageError(f"environment variable AWS_RETRY_MODE={mode!r} is not one of "
                           "standard, adaptive, legacy")
    if os.environ.get("AWS_MAX_ATTEMPTS", "").strip():
        total = env_number("AWS_MAX_ATTEMPTS", 11, int)
        if total < 1:
            raise StorageError(f"environment variable AWS_MAX_ATTEMPTS={total} must be ≥ 1")
        return {"mode": mode, "total_max_attempts": total}
    return {"mode": mode, "max_attempts": 10}


def _new_client() -> Any:
    """A new S3 client configured from the environment, with retries and a big pool, that
    rides out an endpoint gone for up to ``SAFELORA_S3_OUTAGE_S`` (:mod:`.s3_outage`).

    Each client gets a fresh session, so credentials and endpoint are read from the
    environment now (boto3's default session is not thread-safe and caches credentials), but
    the sessions share one botocore data loader so the service model JSON is parsed once per
    process instead of once per client (~0.1 s each).
    """
    global _loader
    with _loader_lock:
        if _loader is None:
            _loader = botocore.loaders.create_loader()
        bs = botocore.session.get_session()
        bs.register_component("data_loader", _loader)
        client = boto3.session.Session(botocore_session=bs).client(
            "s3", config=Config(retries=_retries(), max_pool_connections=64))
    # botocore's retries cover a failed request, not a server down for seconds (a restart).
    return ride_out_outages(client)


class S3Storage(Storage):
    """Objects under ``s3://bucket/prefix``.

    Thread-safe: one boto3 client (created lazily under a lock) is shared by all threads.

    Args:
        rest: ``bucket`` or ``bucket/prefix`` (the URI without ``s3://``).

    Attributes:
        bucket: The bucket name.
        prefix: The key prefix of the root, without leading or trailing ``/`` (may be empty).
        part_size: Size of each ranged GET when :meth:`read_into` splits a large read.
        max_concurrency: Ranged GETs in flight for one :meth:`read_into`.
        list_page_size: Keys per LIST request (``None``: the server's default, 1000).
        bytes_read: Total body bytes fetched by ranged reads on this instance.
    """

    remote = True

    def __init__(self, rest: str) -> None:
        bucket, _, prefix = rest.strip("/").partition("/")
        if not bucket:
            raise StorageError(f"s3:// URI needs a bucket name, got 's3://{rest}'")
        self.bucket = bucket
        self.prefix = normalize_relpath(prefix.strip("/")) if prefix.strip("/") else ""
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.part_size = DEFAULT_PART_SIZE
        self.max_concurrency = DEFAULT_MAX_CONCURRENCY
        self.list_page_size: int | None = None
        self.bytes_read = 0
        self._client: Any = None
        self._lock = threading.Lock()  # guards lazy client creation

    def __repr__(self) -> str:
        return f"S3Storage({self.uri!r})"

    def __reduce__(self):  # re-open on the other side instead of pickling the client
        return (S3Storage, (f"{self.bucket}/{self.prefix}" if self.prefix else self.bucket,))

    # -- plumbing ----------------------------------------------------------------------------
    @property
    def client(self) -> Any:
        """The boto3 S3 client, created on first use."""
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = _new_client()
        return self._client

    def _key(self, path: str) -> str:
        rel = normalize_relpath(path)
        if not rel:
            raise StorageError(f"empty object path under {self.uri}")
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def _raise(self, exc: Exception, path: str, op: str) -> NoReturn:
        """Translate a boto error into NotFoundError/StorageError naming the s3:// URI.

        Only the error code and the server's message are used: never request headers,
        signatures or credentials.
        """
        where = self.describe(path)
        if isinstance(exc, botocore.exceptions.ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            msg = str(err.get("Message", "")).strip()
            status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            if code == "NoSuchBucket":
                raise NotFoundError(
                    f"{where} not found: bucket {self.bucket!r} does not exist"
                ) from exc
            if code in _NOT_FOUND_CODES or status == "404":
                raise NotFoundError(f"{where} not found") from exc
            if code in _DENIED_CODES or status == "403":
                raise StorageError(
                    f"access denied to {where} ({op}, HTTP 403 {code}): check the credentials "
                    f"and the bucket policy"
                ) from exc
            if code == "PreconditionFailed" or status == "412":
                raise ChangedError(f"{where} changed since it was listed ({op}, HTTP 412)"
                                   ) from exc
            if code == "InvalidRange" or status == "416":
                raise StorageError(
                    f"byte range is past the end of {where} ({op}, HTTP 416)"
                ) from exc
            detail = f"{code}: {msg}" if msg else code or f"HTTP {status}"
            raise StorageError(f"{op} {where} failed ({detail})") from exc
        if isinstance(exc, botocore.exceptions.NoCredentialsError):
            raise StorageError(
                f"{op} {where} failed: no AWS credentials found (set AWS_ACCESS_KEY_ID/"
                f"AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an instance role)"
            ) from exc
        if isinstance(exc, S3UploadFailedError):
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, botocore.exceptions.ClientError):
                self._raise(cause, path, op)
            raise StorageError(f"{op} {where} failed: upload failed") from exc
        if isinstance(exc, botocore.exceptions.BotoCoreError):
            raise StorageError(f"{op} {where} failed ({type(exc).__name__}: {exc})") from exc
        raise exc

    def _head(self, path: str) -> dict[str, Any]:
        key = self._key(path)
        try:
            return self.client.head_object(Bucket=self.bucket, Key=key)
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            self._raise(exc, path, "HEAD")

    # -- reading -----------------------------------------------------------------------------
    def size(self, path: str) -> int:
        """Size of the object in bytes (HEAD)."""
        return int(self._head(path)["ContentLength"])

    def read_range(self, path: str, start: int, length: int) -> bytes:
        """Exactly ``length`` bytes from ``start`` with one ranged GET."""
        check_range(start, length)
        buf = bytearray(length)
        self.read_into(path, start, memoryview(buf))
        return bytes(buf)

    def read_into(self, path: str, start: int, buffer: memoryview, *,
                  if_version: str | None = None) -> None:
        """Fill ``buffer`` from ``start``; reads above :attr:`part_size` go in parallel parts.
        With ``if_version`` (an ETag as listed) every GET carries ``If-Match``: the parts of
        one read never mix two versions of a rewritten object (:class:`ChangedError`)."""
        view = as_byte_view(buffer)
        n = len(view)
        check_range(start, n)
        key = self._key(path)
        if n == 0:
            # No Range header can ask for zero bytes; check the object and offset instead.
            self._check_version(path, if_version)
            size = self.size(path)
            if start > size:
                raise StorageError(
                    f"byte range [{start}, {start}) is past the end of {self.describe(path)} "
                    f"({size} bytes)"
                )
            return
        part = max(1, int(self.part_size))
        cond = {} if if_version is None else {"IfMatch": f'"{if_version}"'}
        if n <= part:
            self._get_into(path, key, start, view, cond)
            return
        parts = [(off, min(part, n - off)) for off in range(0, n, part)]
        workers = max(1, min(int(self.max_concurrency), len(parts)))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="s3-range") as pool:
            futures = [
                pool.submit(self._get_into, path, key, start + off, view[off : off + ln], cond)
                for off, ln in parts
            ]
            _done, pending = wait(futures, return_when=FIRST_EXCEPTION)
            for f in pending:  # fail fast: don't start parts nobody will use
                f.cancel()
            for f in futures:
                if f.done() and not f.cancelled() and f.exception() is not None:
                    raise f.exception()  # type: ignore[misc]

    def _get_into(self, path: str, key: str, start: int, view: memoryview,
                  cond: dict[str, str]) -> None:
        """One ranged GET streamed into ``view``, checking the byte count; ``cond``: its
        conditional headers."""
        n = len(view)
        rng = f"bytes={start}-{start + n - 1}"
        for attempt in range(1, _BODY_ATTEMPTS + 1):
            try:
                resp = self.client.get_object(Bucket=self.bucket, Key=key, Range=rng, **cond)
            except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
                self._raise(exc, path, f"GET {rng}")
            body = resp["Body"]
            got = 0
            try:
                for chunk in body.iter_chunks(_STREAM_CHUNK):
                    k = len(chunk)
                    if got + k > n:
                        raise StorageError(
                            f"GET {self.describe(path)} returned more than the {n} bytes asked "
                            f"for with {rng} (server ignored the Range header?)"
                        )
                    view[got : got + k] = chunk
                    got += k
            except _BODY_ERRORS as exc:
                self._count(got)
                if attempt == _BODY_ATTEMPTS:
                    self._raise(exc, path, "GET")
                logger.warning(
                    "re-reading %s (%s) after a broken response stream: %s",
                    self.describe(path),
                    rng,
                    type(exc).__name__,
                )
                continue
            finally:
                body.close()
            self._count(got)
            if got != n:
                # ContentRange is "bytes a-b/total"; the total says how short the object is.
                total = str(resp.get("ContentRange", "")).rpartition("/")[2] or "?"
                raise StorageError(
                    f"short read from {self.describe(path)}: wanted bytes [{start}, {start + n}) "
                    f"but got {got} (the object has {total} bytes)"
                )
            return

    def read(self, path: str, max_bytes: int = DEFAULT_MAX_READ_BYTES, *,
             if_version: str | None = None) -> bytes:
        """The whole object with one GET (no HEAD first: a round trip saved per small file);
        refuses objects larger than ``max_bytes`` before reading their body. A body cut short
        is read again with the same request (botocore retries only the request itself).
        ``if_version``: the ETag as listed, sent as ``If-Match``."""
        key = self._key(path)
        cond = {} if if_version is None else {"IfMatch": f'"{if_version}"'}
        for attempt in range(1, _BODY_ATTEMPTS + 1):
            try:
                resp = self.client.get_object(Bucket=self.bucket, Key=key, **cond)
            except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
                self._raise(exc, path, "GET")
            body = resp["Body"]
            broken: Exception | None = None
            try:
                n = int(resp["ContentLength"])
                if n > max_bytes:
                    raise StorageError(f"{self.describe(path)} is {n} bytes, more than the "
                                       f"{max_bytes} allowed here")
                data = body.read()
            except _BODY_ERRORS as exc:
                broken, data = exc, b""
            finally:
                body.close()
            self._count(len(data))
            if broken is None and len(data) == n:
                return data
            if attempt == _BODY_ATTEMPTS:
                if broken is not None:
                    self._raise(broken, path, "GET")
                raise StorageError(f"short read from {self.describe(path)}: got {len(data)} "
                                   f"of its {n} bytes")
            logger.warning("re-reading %s after a broken response stream: %s",
                           self.describe(path), type(broken).__name__ if broken else "short")
        raise AssertionError("unreachable")

    def exists(self, path: str) -> bool:
        """Whether an object exists at ``path`` (HEAD)."""
        try:
            self._head(path)
        except NotFoundError:
            return False
        return True

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Objects under the "directory" ``prefix``, in lexicographic order of path.

        AWS returns keys in UTF-8 binary order, but not every S3 server does: SeaweedFS walks
        its directory tree ("a/b" before "a-c"). The pages are gathered and sorted (a catalog
        of 10,000 keys is ~1 MB of names), so the order never depends on the server.
        """
        rel = normalize_relpath(prefix.rstrip("/"))
        full = "/".join(p for p in (self.prefix, rel) if p)
        s3_prefix = full + "/" if full else ""
        cut = len(self.prefix) + 1 if self.prefix else 0
        paginator = self.client.get_paginator("list_objects_v2")
        pagination = {"PageSize": self.list_page_size} if self.list_page_size else {}
        found: list[ObjectInfo] = []
        try:
            pages = paginator.paginate(
                Bucket=self.bucket, Prefix=s3_prefix, PaginationConfig=pagination
            )
            for page in pages:
                for obj in page.get("Contents", ()):
                    key = obj["Key"]
                    if key.endswith("/"):  # "folder" placeholder objects made by consoles
                        continue
                    found.append(ObjectInfo(key[cut:], int(obj["Size"]), obj["ETag"].strip('"')))
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            self._raise(exc, rel, "LIST")
        # Python orders str by code point, which is the order of their UTF-8 bytes.
        found.sort(key=lambda o: o.path)
        yield from found

    def version(self, path: str) -> str:
        """The object's ETag, without quotes."""
        return str(self._head(path)["ETag"]).strip('"')

    # -- writing -----------------------------------------------------------------------------
    def put_bytes(self, path: str, data: bytes | bytearray) -> str | None:
        """One PUT; S3 makes the object visible only once it is complete. Returns its ETag."""
        key = self._key(path)
        try:  # a bytearray goes as it is (bytes() of it would copy the adapter)
            resp = self.client.put_object(Bucket=self.bucket, Key=key, Body=data)
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            self._raise(exc, path, "PUT")
        etag = resp.get("ETag")
        return str(etag).strip('"') if etag else None

    def put_bytes_if(self, path: str, data: bytes, *, if_version: str | None) -> bool:
        """A conditional PUT (``If-None-Match: *`` / ``If-Match: <etag>``); False on 412/409."""
        key = self._key(path)
        cond = {"IfNoneMatch": "*"} if if_version is None else {"IfMatch": f'"{if_version}"'}
        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=bytes(data), **cond)
        except botocore.exceptions.ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey"):
                return False
            self._raise(exc, path, "conditional PUT")
        except botocore.exceptions.BotoCoreError as exc:
            self._raise(exc, path, "conditional PUT")
        return True

    def put_file(self, path: str, local_path: str) -> str | None:
        """Upload a local file (multipart above 64 MiB; atomic: visible on completion).

        Returns:
            The object's ETag (as :meth:`list` and :meth:`version` give it): from the PUT's
            response for a single PUT, from a HEAD after a multipart upload (the transfer
            manager does not hand the completion's response on).
        """
        key = self._key(path)
        try:
            small = os.path.getsize(local_path) < UPLOAD_PART_SIZE
        except FileNotFoundError:
            raise NotFoundError(f"local file to upload not found: {local_path}") from None
        if small:
            # One PUT, without a transfer manager (its thread pool per call cost more than
            # the request itself for a small adapter file), of the bytes rather than the file
            # object: botocore then neither seeks nor checksums a file in Python chunks (a
            # third of the client's CPU per small PUT, measured: docs/benchmarks.md §15.2).
            try:
                with open(local_path, "rb") as f:
                    data = f.read()
                resp = self.client.put_object(Bucket=self.bucket, Key=key, Body=data)
            except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
                self._raise(exc, path, "PUT")
            etag = resp.get("ETag")
            return str(etag).strip('"') if etag else None
        config = TransferConfig(
            multipart_threshold=UPLOAD_PART_SIZE,
            multipart_chunksize=UPLOAD_PART_SIZE,
            max_concurrency=DEFAULT_MAX_CONCURRENCY,
        )
        try:
            self.client.upload_file(local_path, self.bucket, key, Config=config)
        except FileNotFoundError:
            raise NotFoundError(f"local file to upload not found: {local_path}") from None
        except (
            botocore.exceptions.ClientError,
            botocore.exceptions.BotoCoreError,
            S3UploadFailedError,
        ) as exc:
            self._raise(exc, path, "PUT")
        return self.version(path)

    def delete(self, path: str) -> None:
        """Delete the object (S3 treats deleting a missing key as success)."""
        key = self._key(path)
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key)
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            self._raise(exc, path, "DELETE")
