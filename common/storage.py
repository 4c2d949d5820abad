"""Object storage: the orchestrator's credentialed S3 client and the miners' URL-only transfer functions.

Only the orchestrator holds S3 credentials (`ObjectStore`); it hands miners presigned URLs, and miners move
bytes with the module functions `upload_to_url`, `download_from_url` and `upload_multipart`, which need
nothing but those URLs. Every failure surfaces as `StorageError`. Given a `stop` event, they start no try
once it is set, cut the wait between tries short, and check it between the chunks of a streamed body; that
raises `common.stopping.Stopping`, which is not a `StorageError`: a stopping miner does not take its own
abandoned download for a bad source.

Transfers of at least `PROGRESS_MIN_BYTES` (weights, checkpoints) report progress: a rich bar when stderr is
a terminal, else an INFO log line at most every quarter or few seconds. Smaller ones (the activations and
gradients of the hot path) take the plain code path, with no progress bookkeeping at all.
"""

from __future__ import annotations

import io
import logging
import math
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import urlsplit

import boto3
import httpx
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from pydantic import BaseModel, ConfigDict, Field
from tenacity import (
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)

from common.codec import content_hash
from common.config import S3Settings
from common.stopping import pause, raise_if_stopping

T = TypeVar("T")

MAX_KEY_LEN = 512
# Slashes separate segments; everything else is what run ids, ss58 hotkeys and item ids are made of.
_KEY_CHARS = re.compile(r"[A-Za-z0-9._/-]+")
_DELETE_BATCH = 1000  # DeleteObjects accepts at most 1000 keys per call.
_MAX_PART_NUMBER = 10_000  # S3's limit on parts per multipart upload.
_MAX_PRESIGN_S = 7 * 24 * 3600  # SigV4 presigned URLs cannot live longer than a week.
_ERROR_EXCERPT_CHARS = 300

DEFAULT_TIMEOUT_S = 60.0

log = logging.getLogger(__name__)

# Transfers this large or larger report progress; read at call time so tests can lower it.
PROGRESS_MIN_BYTES = 16 * 2**20
PROGRESS_LOG_EVERY_S = 5.0
_PROGRESS_LOG_STEPS = 4  # a log line at each quarter, besides the time-based ones
_CHUNK_BYTES = 2**20  # the slice size of streamed uploads and reads that report progress
_MIB = 2**20


class StorageError(RuntimeError):
    """A storage operation failed; `status` is the HTTP status when the store answered with one."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ObjectInfo(BaseModel):
    """What a HEAD reveals about a stored object."""

    model_config = ConfigDict(frozen=True)

    key: str
    size: int = Field(ge=0)
    etag: str = Field(description="ETag without the surrounding quotes.")


class CompletedPart(BaseModel):
    """One uploaded part of a multipart upload, as CompleteMultipartUpload needs it."""

    model_config = ConfigDict(frozen=True)

    part_number: int = Field(ge=1, le=_MAX_PART_NUMBER)
    etag: str = Field(min_length=1, description="ETag without the surrounding quotes.")


class RetryPolicy(BaseModel):
    """Bounded exponential backoff (with jitter, so many miners do not retry in lockstep)."""

    model_config = ConfigDict(frozen=True)

    attempts: int = Field(4, ge=1)
    initial_wait_s: float = Field(0.5, ge=0)
    max_wait_s: float = Field(4.0, ge=0)


DEFAULT_RETRY = RetryPolicy()


# ---------------------------------------------------------------------------------------------------------
# Progress of long transfers


def progress_line(verb: str, label: str, done: int, total: int, elapsed_s: float) -> str:
    """One progress report, e.g. "uploading checkpoint stage 1: 64/256 MiB, 21 MiB/s"."""
    rate = done / elapsed_s / _MIB if elapsed_s > 0 else 0.0
    return f"{verb} {label}: {done / _MIB:,.0f}/{total / _MIB:,.0f} MiB, {rate:,.1f} MiB/s"


def progress_log_due(done: int, total: int, logged_done: int, since_logged_s: float) -> bool:
    """Whether a log line is due: `done` reached a quarter `logged_done` had not, or it has been a while."""
    if total <= 0 or done <= logged_done:
        return False
    if since_logged_s >= PROGRESS_LOG_EVERY_S:
        return True
    return done * _PROGRESS_LOG_STEPS // total > logged_done * _PROGRESS_LOG_STEPS // total


# At most one rich bar at a time: concurrent transfers (a miner's threads) fall back to log lines rather
# than fight over the terminal.
_BAR_LOCK = threading.Lock()


class TransferProgress:
    """Progress of one transfer of `total` bytes; `advance` is thread-safe and takes negative steps (a
    rewound retry). Use as a context manager, or call `close`."""

    def __init__(
        self, verb: str, label: str, total: int, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.verb, self.label, self.total = verb, label, total
        self.done = 0
        self._clock = clock
        self._start = self._logged_at = clock()
        self._logged_done = 0
        self._lock = threading.Lock()
        self._bar: Any = None
        if sys.stderr.isatty() and _BAR_LOCK.acquire(blocking=False):
            self._bar = self._start_bar()

    def _start_bar(self) -> Any:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self._task = bar.add_task(f"{self.verb} {self.label}", total=self.total)
        bar.start()
        return bar

    def advance(self, n: int) -> None:
        with self._lock:
            self.done = min(self.total, max(0, self.done + n))
            if self._bar is not None:
                self._bar.update(self._task, completed=self.done)
                return
            now = self._clock()
            if not progress_log_due(self.done, self.total, self._logged_done, now - self._logged_at):
                return
            self._logged_done, self._logged_at = self.done, now
            line = progress_line(self.verb, self.label, self.done, self.total, now - self._start)
        log.info(line)

    def close(self) -> None:
        with self._lock:
            bar, self._bar = self._bar, None
        if bar is not None:
            bar.stop()
            _BAR_LOCK.release()

    def __enter__(self) -> TransferProgress:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _progress_for(verb: str, total: int, label: str | None, url: str = "") -> TransferProgress | None:
    """A progress reporter for a transfer of `total` bytes named `label` (else by `url`'s path), or None
    below the threshold: small transfers pay one comparison."""
    if total < PROGRESS_MIN_BYTES:
        return None
    return TransferProgress(verb, label or _url_label(url), total)


@contextmanager
def _optional(progress: TransferProgress | None) -> Iterator[TransferProgress | None]:
    try:
        yield progress
    finally:
        if progress is not None:
            progress.close()


# ---------------------------------------------------------------------------------------------------------
# Keys


def validate_key(key: str) -> str:
    """Return `key` if it is a safe object key, else raise StorageError.

    Empty, "." and ".." segments are refused as well as a leading "/": HTTP clients normalise such paths
    (RFC 3986 dot-segment removal), which would break presigned signatures or escape a key's prefix.
    """
    if not key or len(key) > MAX_KEY_LEN:
        raise StorageError(f"object key must be 1..{MAX_KEY_LEN} characters, got {len(key)}")
    if not _KEY_CHARS.fullmatch(key):
        raise StorageError(f"object key has characters outside [A-Za-z0-9._/-]: {key[:80]!r}")
    if ".." in key or key.startswith("/"):
        raise StorageError(f"object key must not contain '..' or start with '/': {key[:80]!r}")
    if any(segment in ("", ".") for segment in key.split("/")):
        raise StorageError(f"object key has an empty or '.' segment: {key[:80]!r}")
    return key


def validate_prefix(prefix: str) -> str:
    """Like `validate_key`, but also accepts "" (everything) and a trailing "/"."""
    if prefix:
        validate_key(prefix.removesuffix("/"))
    return prefix


def part_count(size: int, part_size: int) -> int:
    """How many parts (and so presigned part URLs) an object of `size` bytes needs; at least one."""
    if part_size <= 0:
        raise StorageError(f"part size must be positive, got {part_size}")
    return max(1, math.ceil(size / part_size))


def _unquote_etag(etag: str) -> str:
    return etag.strip().strip('"')


# ---------------------------------------------------------------------------------------------------------
# Server side: holds the credentials


class ObjectStore:
    """The orchestrator's handle on the bucket: presigns URLs for miners and manages objects directly."""

    def __init__(self, client: Any, bucket: str, *, region: str, presign_expiry_s: int) -> None:
        self._s3 = client
        self.bucket = bucket
        self._region = region
        self._presign_expiry_s = presign_expiry_s

    @classmethod
    def from_settings(
        cls,
        settings: S3Settings,
        *,
        connect_timeout_s: float = 10.0,
        read_timeout_s: float = 60.0,
        attempts: int = 4,
    ) -> ObjectStore:
        """The store `settings` describe; a preflight check passes short timeouts and one attempt."""
        config = Config(
            # Without these some stores get SigV2 or virtual-host URLs that 127.0.0.1 and R2 cannot serve.
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            retries={"max_attempts": attempts, "mode": "standard"},
            connect_timeout=connect_timeout_s,
            read_timeout=read_timeout_s,
            # The orchestrator checks uploads from a pool of UPLOAD_CHECK_THREADS threads at once; botocore's
            # default of 10 connections would queue them.
            max_pool_connections=UPLOAD_CHECK_THREADS,
        )
        client = boto3.client(
            "s3",
            endpoint_url=settings.endpoint_url or None,
            region_name=settings.region,
            aws_access_key_id=settings.access_key_id.get_secret_value(),
            aws_secret_access_key=settings.secret_access_key.get_secret_value(),
            config=config,
        )
        return cls(
            client, settings.bucket, region=settings.region, presign_expiry_s=settings.presign_expiry_s
        )

    # -- bucket ---------------------------------------------------------------------------------------

    def ensure_bucket(self) -> None:
        """Create the bucket unless it exists; safe to call repeatedly and from racing processes."""
        try:
            self._s3.head_bucket(Bucket=self.bucket)
            return
        except ClientError as e:
            if _status(e) != 404:
                raise _wrap(e, f"head bucket {self.bucket}") from e
        except BotoCoreError as e:  # no connection, no credentials: no HTTP status to go by
            raise StorageError(f"head bucket {self.bucket}: {e}") from e
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        # us-east-1 rejects an explicit LocationConstraint; R2's "auto" is not a location.
        if self._region not in ("us-east-1", "auto"):
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self._region}
        try:
            self._s3.create_bucket(**kwargs)
        except ClientError as e:
            if _code(e) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise _wrap(e, f"create bucket {self.bucket}") from e
        except BotoCoreError as e:
            raise StorageError(f"create bucket {self.bucket}: {e}") from e

    # -- presigning -----------------------------------------------------------------------------------

    def presign_put(self, key: str, *, expires_s: int | None = None) -> str:
        return self._presign("put_object", {"Key": validate_key(key)}, expires_s)

    def presign_get(self, key: str, *, expires_s: int | None = None) -> str:
        return self._presign("get_object", {"Key": validate_key(key)}, expires_s)

    def presign_part(
        self, key: str, upload_id: str, part_number: int, *, expires_s: int | None = None
    ) -> str:
        if not 1 <= part_number <= _MAX_PART_NUMBER:
            raise StorageError(f"part number must be 1..{_MAX_PART_NUMBER}, got {part_number}")
        params = {"Key": validate_key(key), "UploadId": upload_id, "PartNumber": part_number}
        return self._presign("upload_part", params, expires_s)

    def _presign(self, method: str, params: dict[str, Any], expires_s: int | None) -> str:
        expires = self._presign_expiry_s if expires_s is None else expires_s
        if not 1 <= expires <= _MAX_PRESIGN_S:
            raise StorageError(f"presign expiry must be 1..{_MAX_PRESIGN_S} s, got {expires}")
        with _s3_errors(f"presign {method}"):
            url: str = self._s3.generate_presigned_url(
                method, Params={"Bucket": self.bucket, **params}, ExpiresIn=expires
            )
        return url

    # -- objects --------------------------------------------------------------------------------------

    def head(self, key: str) -> ObjectInfo | None:
        """Size and ETag of `key`, or None when there is no such object."""
        resp = self._call_or_none("head", key, self._s3.head_object)
        if resp is None:
            return None
        return ObjectInfo(key=key, size=resp["ContentLength"], etag=_unquote_etag(resp["ETag"]))

    def _call_or_none(
        self, what: str, key: str, call: Callable[..., dict[str, Any]]
    ) -> dict[str, Any] | None:
        """`call(Bucket, Key)`'s response, or None when there is no such object."""
        validate_key(key)
        try:
            return call(Bucket=self.bucket, Key=key)
        except ClientError as e:
            if _status(e) == 404:
                return None
            raise _wrap(e, f"{what} {key}") from e
        except BotoCoreError as e:
            raise StorageError(f"{what} {key}: {e}") from e

    def get_bytes(self, key: str, *, max_bytes: int, label: str | None = None) -> bytes:
        """The whole object, refusing (before reading it) one larger than `max_bytes`. `label` names it in
        progress reports (default: the key)."""
        info = self.head(key)
        if info is None:
            raise StorageError(f"get {key}: no such object", status=404)
        if info.size > max_bytes:
            raise StorageError(f"get {key}: {info.size} bytes exceeds the limit of {max_bytes}")
        with _s3_errors(f"get {key}"):
            resp = self._s3.get_object(Bucket=self.bucket, Key=key)
            # The object may have been replaced since the HEAD; never read past the limit regardless.
            data = _read_body(resp["Body"], max_bytes + 1, label or key, info.size)
        if len(data) > max_bytes:
            raise StorageError(f"get {key}: object grew past the limit of {max_bytes} bytes")
        return data

    def get_exact(self, key: str, size: int, *, label: str | None = None) -> bytes | None:
        """The object if it has exactly `size` bytes, else None (missing, shorter or longer): one GET."""
        resp = self._call_or_none("get", key, self._s3.get_object)
        if resp is None:
            return None
        with _s3_errors(f"get {key}"):
            data = _read_body(resp["Body"], size + 1, label or key, size)
        return data if len(data) == size else None

    def get_verified(self, key: str, size: int, sha256: str, *, label: str | None = None) -> bytes | None:
        """The object if it is exactly what its producer announced (size and sha256), else None: the bucket
        is shared and a presigned PUT cannot pin the content, so what a reader trusts it checks itself."""
        data = self.get_exact(key, size, label=label)
        return data if data is not None and content_hash(data) == sha256 else None

    def put_bytes(self, key: str, data: bytes, *, label: str | None = None) -> str:
        """Store `data` under `key`; returns the ETag. `label` names it in progress reports (default: the
        key)."""
        validate_key(key)
        progress = _progress_for("uploading", len(data), label or key)
        if progress is None:
            with _s3_errors(f"put {key}"):
                resp = self._s3.put_object(Bucket=self.bucket, Key=key, Body=data)
            return _unquote_etag(resp["ETag"])
        with progress, _s3_errors(f"put {key}"):
            try:
                # The transfer manager reports bytes through Callback (negative ones when a part is retried)
                # and sends large objects in parallel parts.
                self._s3.upload_fileobj(
                    io.BytesIO(data), self.bucket, key, Callback=progress.advance, Config=_TRANSFER_CONFIG
                )
            except S3UploadFailedError as e:
                raise StorageError(f"put {key}: {e}") from e
        info = self.head(key)  # upload_fileobj does not return the ETag
        if info is None:
            raise StorageError(f"put {key}: the object is missing right after its upload")
        return info.etag

    def delete(self, keys: list[str]) -> None:
        """Delete `keys` (missing ones are fine), in batches of the 1000 that DeleteObjects allows."""
        for key in keys:
            validate_key(key)
        for start in range(0, len(keys), _DELETE_BATCH):
            batch = keys[start : start + _DELETE_BATCH]
            with _s3_errors(f"delete {len(batch)} objects"):
                resp = self._s3.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
                )
            # DeleteObjects answers 200 even when single keys fail; those come back in Errors.
            if errors := resp.get("Errors"):
                first = errors[0]
                raise StorageError(
                    f"delete: {len(errors)} keys failed, e.g. {first.get('Key')}: {first.get('Message')}"
                )

    def list_keys(self, prefix: str) -> list[str]:
        """All keys under `prefix` ("" lists the whole bucket), following pagination."""
        validate_prefix(prefix)
        keys: list[str] = []
        with _s3_errors(f"list {prefix!r}"):
            pages = self._s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
            for page in pages:
                keys.extend(obj["Key"] for obj in page.get("Contents", []))
        return keys

    # -- multipart ------------------------------------------------------------------------------------

    def create_multipart(self, key: str) -> str:
        """Start a multipart upload; returns its upload id."""
        validate_key(key)
        with _s3_errors(f"create multipart {key}"):
            resp = self._s3.create_multipart_upload(Bucket=self.bucket, Key=key)
        upload_id: str = resp["UploadId"]
        return upload_id

    def complete_multipart(self, key: str, upload_id: str, parts: list[CompletedPart]) -> None:
        validate_key(key)
        if not parts:
            raise StorageError(f"complete multipart {key}: no parts")
        ordered = sorted(parts, key=lambda p: p.part_number)
        if len({p.part_number for p in ordered}) != len(ordered):
            raise StorageError(f"complete multipart {key}: duplicate part numbers")
        upload = {"Parts": [{"PartNumber": p.part_number, "ETag": f'"{p.etag}"'} for p in ordered]}
        with _s3_errors(f"complete multipart {key}"):
            self._s3.complete_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload=upload
            )

    def abort_multipart(self, key: str, upload_id: str) -> None:
        validate_key(key)
        with _s3_errors(f"abort multipart {key}"):
            self._s3.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)


# How many reads of the store the orchestrator runs at once to check uploads (each mostly waits on the store).
UPLOAD_CHECK_THREADS = 32

# Large uploads through ObjectStore: parts of 16 MiB, a few in parallel.
_TRANSFER_CONFIG = TransferConfig(
    multipart_threshold=16 * _MIB, multipart_chunksize=16 * _MIB, max_concurrency=4
)


def _read_body(body: Any, limit: int, label: str, expected: int) -> bytes:
    """Up to `limit` bytes of a GetObject body, closing it; in slices with progress when `expected` is
    large, in one read otherwise."""
    try:
        progress = _progress_for("downloading", expected, label)
        if progress is None:
            data: bytes = body.read(limit)
            return data
        buf = bytearray()
        with progress:
            while len(buf) < limit:
                chunk = body.read(min(_CHUNK_BYTES, limit - len(buf)))
                if not chunk:
                    break
                buf += chunk
                progress.advance(len(chunk))
        return bytes(buf)
    finally:
        body.close()


def _status(e: ClientError) -> int | None:
    status: int | None = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return status


def _code(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


def _wrap(e: ClientError, what: str) -> StorageError:
    return StorageError(f"{what}: {_code(e) or 'error'} {e}", status=_status(e))


@contextmanager
def _s3_errors(what: str) -> Iterator[None]:
    """Turn botocore's exceptions into StorageError so callers handle one type."""
    try:
        yield
    except ClientError as e:
        raise _wrap(e, what) from e
    except BotoCoreError as e:
        raise StorageError(f"{what}: {e}") from e


# ---------------------------------------------------------------------------------------------------------
# Client side: presigned URLs only, no credentials


class _RetryableStatus(StorageError):
    """A 5xx or 429: the store is overloaded or failing, so the same request may succeed later."""


# Failures of the connection rather than of the request; ProxyError and UnsupportedProtocol are left out
# because retrying cannot fix them.
_TRANSIENT: tuple[type[BaseException], ...] = (
    httpx.TimeoutException,
    httpx.NetworkError,
    httpx.RemoteProtocolError,
    _RetryableStatus,
)


# httpx's default headers that a presigned S3 transfer does without: stores ignore Accept and User-Agent,
# HTTP/1.1 keeps connections alive without being asked, and S3 never compresses, so Accept-Encoding only
# invites a transfer encoding that would make the bytes counted differ from the object's. Dropping them
# saves about 100 bytes per request (bench/wire.py --s3; a hop's tensor can be as small as 1 KB).
_NEEDLESS_HEADERS = ("accept", "accept-encoding", "connection", "user-agent")


def _lean_request(
    http: httpx.Client,
    method: str,
    url: str,
    timeout_s: float,
    *,
    content: bytes | Iterator[bytes] | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Request:
    """A request to a presigned URL without the client's needless default headers."""
    request = http.build_request(method, url, content=content, headers=headers, timeout=timeout_s)
    for name in _NEEDLESS_HEADERS:
        request.headers.pop(name, None)
    return request


@contextmanager
def _lean_stream(http: httpx.Client, url: str, timeout_s: float) -> Iterator[httpx.Response]:
    """`http.stream("GET", url)` with a lean request: the response, closed on exit."""
    resp = http.send(_lean_request(http, "GET", url, timeout_s), stream=True)
    try:
        yield resp
    finally:
        resp.close()


def upload_to_url(
    url: str,
    data: bytes,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    client: httpx.Client | None = None,
    retry: RetryPolicy = DEFAULT_RETRY,
    label: str | None = None,
    stop: threading.Event | None = None,
) -> str:
    """PUT `data` to a presigned URL; returns the ETag the store gave it (without quotes). `label` names a
    large upload in progress reports (default: the URL's path)."""
    with _optional(_progress_for("uploading", len(data), label, url)) as progress:
        return _upload(url, data, timeout_s, client, retry, progress, stop)


def _upload(
    url: str,
    data: bytes,
    timeout_s: float,
    client: httpx.Client | None,
    retry: RetryPolicy,
    progress: TransferProgress | None,
    stop: threading.Event | None = None,
) -> str:
    def put(http: httpx.Client) -> str:
        if progress is None:
            return _etag_of(http.send(_lean_request(http, "PUT", url, timeout_s, content=data)), url)
        with _attempt(progress) as sent:
            # An explicit length keeps httpx from chunked encoding, which presigned S3 PUTs refuse.
            request = _lean_request(
                http,
                "PUT",
                url,
                timeout_s,
                content=_slices(data, progress, sent, stop),
                headers={"Content-Length": str(len(data))},
            )
            return _etag_of(http.send(request), url)

    return _with_retries(f"PUT {_redact(url)}", put, client, retry, stop)


def _etag_of(resp: httpx.Response, url: str) -> str:
    _raise_for_status(resp, resp.text)
    etag = resp.headers.get("etag")
    if not etag:
        raise StorageError(f"PUT {_redact(url)}: response has no ETag", status=resp.status_code)
    return _unquote_etag(etag)


def download_from_url(
    url: str,
    *,
    max_bytes: int,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    client: httpx.Client | None = None,
    retry: RetryPolicy = DEFAULT_RETRY,
    label: str | None = None,
    stop: threading.Event | None = None,
) -> bytes:
    """GET a presigned URL, aborting as soon as more than `max_bytes` have arrived. `label` names a large
    download in progress reports (default: the URL's path)."""
    progress: TransferProgress | None = None

    def get(http: httpx.Client) -> bytes:
        nonlocal progress
        with _lean_stream(http, url, timeout_s) as resp:
            if resp.status_code >= 300:
                _raise_for_status(resp, _read_excerpt(resp))
            declared = resp.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                raise StorageError(f"GET {_redact(url)}: {declared} bytes exceeds the limit of {max_bytes}")
            expected = int(declared) if declared is not None and declared.isdigit() else max_bytes
            if progress is None:
                progress = _progress_for("downloading", expected, label, url)
            if progress is None:
                return _read_capped(resp, max_bytes, url, stop=stop)
            with _attempt(progress) as sent:
                return _read_capped(resp, max_bytes, url, progress, sent, stop)

    try:
        return _with_retries(f"GET {_redact(url)}", get, client, retry, stop)
    finally:
        if progress is not None:
            progress.close()


def upload_multipart(
    part_urls: list[str],
    data: bytes,
    part_size: int,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    client: httpx.Client | None = None,
    retry: RetryPolicy = DEFAULT_RETRY,
    concurrency: int = 4,
    label: str | None = None,
    stop: threading.Event | None = None,
) -> list[CompletedPart]:
    """Upload `data` in `part_size` slices, slice i to `part_urls[i]` (S3 part number i + 1).

    The caller hands the result to the orchestrator, which completes the upload.
    """
    expected = part_count(len(data), part_size)
    if len(part_urls) != expected:
        raise StorageError(
            f"{len(data)} bytes in {part_size}-byte parts need {expected} part URLs, got {len(part_urls)}"
        )

    # One report for the whole object, whichever part's bytes move.
    progress = _progress_for("uploading", len(data), label, part_urls[0])

    def send(index: int, http: httpx.Client) -> CompletedPart:
        chunk = data[index * part_size : (index + 1) * part_size]
        etag = _upload(part_urls[index], chunk, timeout_s, http, retry, progress, stop)
        return CompletedPart(part_number=index + 1, etag=etag)

    with (
        _optional(progress),
        _client_scope(client) as http,
        ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool,
    ):
        return list(pool.map(lambda i: send(i, http), range(expected)))


def _with_retries(
    what: str,
    request: Callable[[httpx.Client], T],
    client: httpx.Client | None,
    retry: RetryPolicy,
    stop: threading.Event | None = None,
) -> T:
    retrying = Retrying(
        stop=stop_after_attempt(retry.attempts),
        wait=wait_exponential(multiplier=retry.initial_wait_s, max=retry.max_wait_s)
        + wait_random(0, retry.initial_wait_s),
        retry=retry_if_exception_type(_TRANSIENT),
        sleep=pause(stop, what),
        reraise=True,
    )

    def attempt(http: httpx.Client) -> T:
        raise_if_stopping(stop, what)
        return request(http)

    with _client_scope(client) as http:
        try:
            return retrying(attempt, http)
        except StorageError:
            raise
        except httpx.HTTPError as e:
            raise StorageError(f"{what}: {type(e).__name__}: {e} (after {retry.attempts} attempts)") from e


@contextmanager
def _client_scope(client: httpx.Client | None) -> Iterator[httpx.Client]:
    """Use the caller's client (connection pool, hooks) or a short-lived one of our own."""
    if client is not None:
        yield client
        return
    with httpx.Client() as own:
        yield own


def _raise_for_status(resp: httpx.Response, body: str) -> None:
    status = resp.status_code
    if status < 300:
        return
    where = f"{resp.request.method} {_redact(str(resp.request.url))}"
    message = f"{where}: HTTP {status}: {body[:_ERROR_EXCERPT_CHARS]}"
    if status >= 500 or status == 429:
        raise _RetryableStatus(message, status=status)
    raise StorageError(message, status=status)


def _read_excerpt(resp: httpx.Response) -> str:
    """The start of an error body, without reading an arbitrarily large one."""
    buf = bytearray()
    for chunk in resp.iter_bytes():
        buf += chunk
        if len(buf) >= _ERROR_EXCERPT_CHARS:
            break
    return buf[:_ERROR_EXCERPT_CHARS].decode("utf-8", errors="replace")


def _read_capped(
    resp: httpx.Response,
    max_bytes: int,
    url: str,
    progress: TransferProgress | None = None,
    sent: list[int] | None = None,
    stop: threading.Event | None = None,
) -> bytes:
    # Content-Length may be absent or wrong (chunked, compressed, hostile), so count what actually arrives.
    buf = bytearray()
    for chunk in resp.iter_bytes():
        raise_if_stopping(stop, f"GET {_redact(url)}")
        buf += chunk
        if len(buf) > max_bytes:
            raise StorageError(f"GET {_redact(url)}: body exceeds the limit of {max_bytes} bytes")
        if progress is not None and sent is not None:
            sent[0] += len(chunk)
            progress.advance(len(chunk))
    return bytes(buf)


@contextmanager
def _attempt(progress: TransferProgress) -> Iterator[list[int]]:
    """Count one attempt's bytes in `sent[0]` and take them back off the progress if the attempt fails, so
    that a retry starts from where the transfer really is."""
    sent = [0]
    try:
        yield sent
    except BaseException:
        progress.advance(-sent[0])
        raise


def _slices(
    data: bytes, progress: TransferProgress, sent: list[int], stop: threading.Event | None = None
) -> Iterator[bytes]:
    """`data` in slices, each counted once httpx has taken it."""
    for start in range(0, len(data), _CHUNK_BYTES):
        raise_if_stopping(stop, "PUT")
        chunk = data[start : start + _CHUNK_BYTES]
        yield chunk
        sent[0] += len(chunk)
        progress.advance(len(chunk))


def _url_label(url: str) -> str:
    """A transfer's name for progress reports: the URL's path, without the query's credentials."""
    return urlsplit(url).path.lstrip("/") or _redact(url)


def _redact(url: str) -> str:
    """The URL without its query: presigned signatures are bearer credentials and must not reach logs."""
    return url.split("?", 1)[0]
