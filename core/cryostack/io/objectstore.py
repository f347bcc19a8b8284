"""The one client of the S3-compatible object store (MinIO, AWS S3, SeaweedFS), on the MinIO Python SDK.

Every method takes an :class:`~cryostack.io.uri.S3Uri` or its ``s3://bucket/key`` string and:

- checks the bucket against ``ObjectStoreSettings.allowed_buckets``;
- retries transient failures (connection errors, timeouts, HTTP 5xx, ``SlowDown`` and other throttling codes) with
  exponential backoff and jitter (``backoff_initial_s``, doubling, capped at :data:`MAX_BACKOFF_S`) up to
  ``max_attempts`` tries, then raises :class:`~cryostack.errors.UnavailableError`;
- raises :class:`~cryostack.errors.NotFoundError` (named by the URI) for a missing object or bucket;
- raises :class:`ObjectStoreAuthError` at once, without retrying, when the store refuses the credentials
  (``SignatureDoesNotMatch``, ``InvalidAccessKeyId``, ``AccessDenied``);
- raises :class:`ObjectStoreError` for any other refusal that retrying cannot fix.

Credentials live only in the MinIO client: they are never logged and never appear in reprs or error messages.

Reads: :meth:`ObjectStore.get_ranges` and :meth:`ObjectStore.read_ranges` coalesce ranges of the same object whose
gap is at most ``coalesce_gap_bytes`` into one ranged GET of at most ``max_span_bytes`` (less when the call is
small, so that each of the ``max_concurrency`` pool workers gets a GET; never less than 1 MiB), run the GETs on
the pool, and split the answers back into the requested ranges.

Writes: objects up to ``part_size_bytes`` go in one PUT; larger ones through :class:`MultipartUpload`, whose parts
are retried one by one and uploaded with bounded concurrency, so memory stays at a few parts whatever the size.
Nothing is visible under the URI until the upload completes; an upload that fails is aborted.

Conditional create (:meth:`ObjectStore.put_if_absent`) sends ``If-None-Match: *``, which AWS S3, MinIO and SeaweedFS
(4.x, checked by the tests, racing writers included) answer with 412 when the key exists. The first conditional
write to a bucket probes whether the store honours the header; on a store that ignores it the method falls back to
stat-then-put, which is not atomic, and logs a warning once.
"""

from __future__ import annotations

import io
import logging
import random
import threading
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime
from typing import BinaryIO, TypeVar

import certifi
import urllib3
from minio import Minio
from minio.datatypes import Part
from minio.deleteobjects import DeleteObject
from minio.error import InvalidResponseError, S3Error, ServerError

from cryostack.config import ObjectStoreSettings
from cryostack.errors import (
    CryostackError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    UnavailableError,
)
from cryostack.io.uri import S3Uri, check_bucket_allowed

log = logging.getLogger(__name__)

T = TypeVar("T")
UriLike = S3Uri | str
Bytes = bytes | bytearray | memoryview

MAX_BACKOFF_S = 20.0
MIN_SPAN_BYTES = 1024 * 1024
STREAM_CHUNK_BYTES = 1024 * 1024
DEFAULT_CONTENT_TYPE = "application/octet-stream"
_PROBE_FOLDER = ".cryostack-probe/"

_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "InternalError",
        "ServiceUnavailable",
        "RequestTimeout",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "OperationAborted",
        "ConditionalRequestConflict",
        "XMinioServerNotInitialized",
    }
)
_AUTH_CODES = frozenset(
    {
        "SignatureDoesNotMatch",
        "InvalidAccessKeyId",
        "AccessDenied",
        "InvalidToken",
        "ExpiredToken",
        "AuthorizationHeaderMalformed",
        "AllAccessDisabled",
        "AccountProblem",
        "InvalidSecurity",
    }
)
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "ResourceNotFound", "NoSuchUpload"})


class ObjectStoreError(CryostackError):
    """The object store refused a request for a reason that retrying will not fix."""


class ObjectStoreAuthError(ObjectStoreError, PermissionDeniedError):
    """The object store refused the configured credentials (never retried)."""


@dataclass(frozen=True)
class ObjectInfo:
    """Size, ETag and modification time of one stored object."""

    uri: S3Uri
    size: int
    etag: str
    last_modified: datetime | None = None


@dataclass(frozen=True)
class CoalescedRange:
    """One ranged GET covering several requested ranges: `members` are (request index, offset in span, length)."""

    offset: int
    length: int
    members: tuple[tuple[int, int, int], ...]


def coalesce_ranges(
    ranges: Sequence[tuple[int, int]], max_gap_bytes: int, max_span_bytes: int
) -> list[CoalescedRange]:
    """Merge (offset, length) ranges whose gap is at most `max_gap_bytes` into spans of at most `max_span_bytes`.

    A range that overlaps the one before it (a repeated request) starts a new span, so that the members of a span
    never overlap and each span can be streamed once from start to end.
    """
    for offset, length in ranges:
        if offset < 0 or length < 0:
            raise InvalidArgumentError("range", f"offset {offset} and length {length} must be non-negative")
    order = sorted(range(len(ranges)), key=lambda i: ranges[i][0])
    spans: list[CoalescedRange] = []
    members: list[tuple[int, int, int]] = []
    start = end = 0
    for index in order:
        offset, length = ranges[index]
        stop = offset + length
        if members and end <= offset <= end + max_gap_bytes and stop - start <= max_span_bytes:
            end = stop
        else:
            if members:
                spans.append(CoalescedRange(start, end - start, tuple(members)))
            members = []
            start, end = offset, stop
        members.append((index, offset - start, length))
    if members:
        spans.append(CoalescedRange(start, end - start, tuple(members)))
    return spans


def _classify(error: BaseException) -> str:
    """One of 'transient', 'auth', 'not_found', 'range' or 'other' for an exception raised by the SDK."""
    if isinstance(error, S3Error):
        status = error.response.status if error.response is not None else 0
        if error.code in _AUTH_CODES:
            return "auth"
        if error.code in _NOT_FOUND_CODES:
            return "not_found"
        if error.code == "InvalidRange":
            return "range"
        if error.code in _TRANSIENT_CODES or status >= 500 or status == 429:
            return "transient"
        return "other"
    if isinstance(error, ServerError):
        return "transient" if error.status_code >= 500 or error.status_code == 429 else "other"
    if isinstance(error, InvalidResponseError):
        # A non-XML answer, typically a proxy's HTML error page; the SDK keeps its status only in `_code`.
        status = int(getattr(error, "_code", 0) or 0)
        return "transient" if status >= 500 or status == 429 else "other"
    if isinstance(error, (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError, OSError)):
        return "transient"
    return "other"


def _describe(error: BaseException) -> str:
    """A one-line description of an SDK error that never contains credentials."""
    if isinstance(error, S3Error):
        return f"{error.code}: {error.message}"
    return f"{type(error).__name__}: {str(error)[:300]}"


class ObjectStore:
    """Retrying, credential-safe access to one S3-compatible endpoint (see the module docstring)."""

    def __init__(
        self,
        settings: ObjectStoreSettings,
        *,
        max_concurrency: int = 8,
        coalesce_gap_bytes: int = 512 * 1024,
        max_span_bytes: int = 8 * 1024 * 1024,
        connect_timeout_s: float = 10.0,
        read_timeout_s: float = 120.0,
    ) -> None:
        self.settings = settings
        self.max_concurrency = max_concurrency
        self.coalesce_gap_bytes = coalesce_gap_bytes
        self.max_span_bytes = max_span_bytes
        # The SDK's own urllib3 retries are switched off: every retry goes through _retrying, which knows which
        # failures are transient and reports UnavailableError when they persist.
        self._http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=connect_timeout_s, read=read_timeout_s),
            maxsize=2 * max_concurrency + 4,
            retries=False,
            cert_reqs="CERT_REQUIRED" if settings.secure else "CERT_NONE",
            ca_certs=certifi.where(),
        )
        self._client = Minio(
            settings.endpoint,
            access_key=settings.access_key.get_secret_value() or None,
            secret_key=settings.secret_key.get_secret_value() or None,
            secure=settings.secure,
            region=settings.region,
            http_client=self._http,
        )
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._conditional_put_honoured: dict[str, bool] = {}

    @classmethod
    def from_env(cls, **kwargs: int | float) -> ObjectStore:
        """A store configured from the ``CRYOSTACK_S3_*`` environment variables."""
        return cls(ObjectStoreSettings(), **kwargs)

    def __repr__(self) -> str:
        scheme = "https" if self.settings.secure else "http"
        return f"ObjectStore({scheme}://{self.settings.endpoint})"

    @property
    def part_size_bytes(self) -> int:
        """Size of every multipart-upload part but the last."""
        return self.settings.part_size_bytes

    def close(self) -> None:
        """Stop the read thread pool and drop idle connections (the store stays usable and reconnects on demand)."""
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
        self._http.clear()

    def __enter__(self) -> ObjectStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- plumbing -------------------------------------------------------------------------------------------------

    def _uri(self, uri: UriLike) -> S3Uri:
        return check_bucket_allowed(S3Uri.coerce(uri), self.settings.allowed_buckets)

    def _object_uri(self, uri: UriLike) -> S3Uri:
        return self._uri(uri).require_object()

    def _executor(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="cryostack-s3")
            return self._pool

    def _retrying(self, what: str, target: S3Uri | str, operation: Callable[[], T]) -> T:
        """Run `operation`, retrying transient failures with backoff and translating errors to domain errors."""
        attempts = self.settings.max_attempts
        delay = self.settings.backoff_initial_s
        for attempt in range(1, attempts + 1):
            try:
                return operation()
            except CryostackError:
                raise
            except Exception as error:  # noqa: BLE001  (every SDK failure is classified below)
                kind = _classify(error)
                if kind != "transient":
                    raise self._translate(kind, what, target, error) from error
                if attempt == attempts:
                    raise UnavailableError(
                        f"{what} {target}: object store at {self.settings.endpoint} unavailable after "
                        f"{attempts} attempts ({_describe(error)})"
                    ) from error
                pause = min(delay, MAX_BACKOFF_S)
                pause = pause / 2 + random.uniform(0, pause / 2)
                log.warning(
                    "%s %s failed (attempt %d/%d, %s); retrying in %.2f s",
                    what, target, attempt, attempts, _describe(error), pause,
                )
                time.sleep(pause)
                delay *= 2
        raise AssertionError("unreachable: the loop returns or raises")

    def _translate(self, kind: str, what: str, target: S3Uri | str, error: Exception) -> CryostackError:
        if kind == "auth":
            return ObjectStoreAuthError(
                f"{what} {target}: object store at {self.settings.endpoint} refused the credentials "
                f"({_describe(error)}); check CRYOSTACK_S3_ACCESS_KEY and CRYOSTACK_S3_SECRET_KEY"
            )
        if kind == "not_found":
            code = error.code if isinstance(error, S3Error) else ""
            reason = {"NoSuchBucket": "no such bucket", "NoSuchUpload": "no such multipart upload"}.get(
                code, "no such object"
            )
            return NotFoundError(str(target), reason)
        if kind == "range":
            return InvalidArgumentError(str(target), "requested byte range lies outside the object")
        return ObjectStoreError(f"{what} {target}: {_describe(error)}")

    # -- buckets --------------------------------------------------------------------------------------------------

    def ensure_bucket(self, bucket: str) -> None:
        """Create `bucket` unless it exists."""
        uri = self._uri(S3Uri(bucket))

        def create() -> None:
            if self._client.bucket_exists(bucket):
                return
            try:
                self._client.make_bucket(bucket)
            except S3Error as error:
                if error.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

        self._retrying("create bucket", uri, create)

    def bucket_exists(self, bucket: str) -> bool:
        """True when `bucket` exists."""
        uri = self._uri(S3Uri(bucket))
        return self._retrying("check bucket", uri, lambda: self._client.bucket_exists(bucket))

    def remove_bucket(self, bucket: str) -> None:
        """Delete the empty bucket `bucket`; NotFoundError when it does not exist."""
        uri = self._uri(S3Uri(bucket))
        self._retrying("remove bucket", uri, lambda: self._client.remove_bucket(bucket))

    # -- writes ---------------------------------------------------------------------------------------------------

    def put_bytes(self, uri: UriLike, data: Bytes, content_type: str = DEFAULT_CONTENT_TYPE) -> ObjectInfo:
        """Store `data` under `uri` (replacing any object there); multipart when larger than one part."""
        target = self._object_uri(uri)
        payload = bytes(data)
        if len(payload) > self.part_size_bytes:
            return self.put_stream(target, io.BytesIO(payload), len(payload), content_type)
        result = self._retrying(
            "put",
            target,
            lambda: self._client.put_object(
                target.bucket, target.key, io.BytesIO(payload), len(payload), content_type=content_type
            ),
        )
        return ObjectInfo(target, len(payload), result.etag or "")

    def put_stream(
        self,
        uri: UriLike,
        readable: BinaryIO,
        length: int | None = None,
        content_type: str = DEFAULT_CONTENT_TYPE,
    ) -> ObjectInfo:
        """Store everything `readable` yields under `uri`, holding at most a few parts in memory.

        When `length` is given, a stream that yields a different number of bytes is refused (and nothing is stored).
        """
        target = self._object_uri(uri)
        part_size = self.part_size_bytes
        first = _read_up_to(readable, part_size)
        if len(first) < part_size:
            _check_length(length, len(first))
            return self.put_bytes(target, first, content_type)
        with self.begin_multipart(target, content_type) as upload:
            upload.submit_part(1, first)
            total, number = len(first), 1
            while chunk := _read_up_to(readable, part_size):
                number += 1
                total += len(chunk)
                upload.submit_part(number, chunk)
            _check_length(length, total)
            return upload.complete()

    def begin_multipart(
        self, uri: UriLike, content_type: str = DEFAULT_CONTENT_TYPE, max_in_flight: int = 2
    ) -> MultipartUpload:
        """Start a multipart upload to `uri`; use it as a context manager so a failure aborts it."""
        return MultipartUpload(self, self._object_uri(uri), content_type, max_in_flight)

    def put_if_absent(self, uri: UriLike, data: Bytes, content_type: str = DEFAULT_CONTENT_TYPE) -> bool:
        """Create `uri` with `data` only if no object exists there; True when this call created it."""
        target = self._object_uri(uri)
        payload = bytes(data)
        if len(payload) > self.part_size_bytes:
            raise InvalidArgumentError("data", f"conditional create is limited to {self.part_size_bytes} bytes")
        if not self._honours_conditional_put(target.bucket):
            if self.exists(target):
                return False
            self.put_bytes(target, payload, content_type)
            return True
        return self._conditional_put(target, payload, content_type)

    def _conditional_put(self, target: S3Uri, payload: bytes, content_type: str) -> bool:
        tries = 0

        def attempt() -> bool:
            nonlocal tries
            tries += 1
            try:
                # The public put_object takes no request headers; _put_object is the SDK's single-PUT primitive.
                self._client._put_object(  # noqa: SLF001
                    target.bucket,
                    target.key,
                    payload,
                    headers={"If-None-Match": "*", "Content-Type": content_type},
                )
                return True
            except S3Error as error:
                if error.code != "PreconditionFailed":
                    raise
                return False

        created = self._retrying("conditional put", target, attempt)
        if not created and tries > 1:
            # An earlier attempt may have succeeded with its answer lost: the object is ours if it holds our bytes.
            return self.get_bytes(target) == payload
        return created

    def _honours_conditional_put(self, bucket: str) -> bool:
        known = self._conditional_put_honoured.get(bucket)
        if known is not None:
            return known
        probe = S3Uri(bucket, f"{_PROBE_FOLDER}{uuid.uuid4().hex}")
        try:
            first = self._conditional_put(probe, b"1", DEFAULT_CONTENT_TYPE)
            second = self._conditional_put(probe, b"2", DEFAULT_CONTENT_TYPE)
        finally:
            self.delete(probe)
        honoured = first and not second
        if not honoured:
            log.warning("object store at %s ignores If-None-Match: conditional creates are not atomic",
                        self.settings.endpoint)
        self._conditional_put_honoured[bucket] = honoured
        return honoured

    # -- reads ----------------------------------------------------------------------------------------------------

    def get_bytes(self, uri: UriLike) -> bytes:
        """The whole content of the object at `uri`."""
        target = self._object_uri(uri)
        return self._retrying("get", target, lambda: self._read(target, 0, 0))

    def get_range(self, uri: UriLike, offset: int, length: int) -> bytes:
        """`length` bytes of the object at `uri` from byte `offset`; InvalidArgumentError if the object is shorter."""
        target = self._object_uri(uri)
        if offset < 0 or length < 0:
            raise InvalidArgumentError("range", f"offset {offset} and length {length} must be non-negative")
        if length == 0:
            return b""
        data = self._retrying("get range", target, lambda: self._read(target, offset, length))
        if len(data) != length:
            raise InvalidArgumentError(str(target), f"object ends before byte {offset + length}")
        return data

    def get_ranges(self, uri: UriLike, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """The bytes of every (offset, length) range of one object, in the order given, with coalesced GETs."""
        target = self._object_uri(uri)
        results: list[bytes] = [b""] * len(ranges)

        def keep(index: int, view: memoryview) -> None:
            results[index] = bytes(view)

        self.read_ranges([(target, offset, length) for offset, length in ranges], keep)
        return results

    def read_ranges(
        self, requests: Sequence[tuple[UriLike, int, int]], sink: Callable[[int, memoryview], None]
    ) -> int:
        """Fetch (uri, offset, length) requests, coalesced per object into streaming GETs run on the pool.

        Calls ``sink(request_index, view)`` as soon as a range's bytes have arrived; calls come from the pool's
        threads, several at once for different requests, and each view is valid during its call only. Returns the
        number of GET requests made. Each GET is read in :data:`STREAM_CHUNK_BYTES` pieces, so the memory of a call
        stays at about ``max_concurrency`` x (one piece + one range) however large its spans.
        """
        by_object: dict[S3Uri, list[int]] = defaultdict(list)
        for index, (uri, offset, length) in enumerate(requests):
            target = self._object_uri(uri)
            if offset < 0 or length < 0:
                raise InvalidArgumentError("range", f"offset {offset} and length {length} must be non-negative")
            if length == 0:
                sink(index, memoryview(b""))
            else:
                by_object[target].append(index)
        # Spans small enough that every worker gets one, so that one call keeps the whole pool busy.
        total_bytes = sum(length for _, _, length in requests)
        span_limit = min(self.max_span_bytes, max(MIN_SPAN_BYTES, -(-total_bytes // self.max_concurrency)))
        jobs: list[tuple[S3Uri, CoalescedRange, list[int]]] = []
        for target, indices in by_object.items():
            ranges = [(requests[i][1], requests[i][2]) for i in indices]
            for span in coalesce_ranges(ranges, self.coalesce_gap_bytes, span_limit):
                jobs.append((target, span, indices))
        executor = self._executor()
        futures = [executor.submit(self._stream_span, target, span, indices, sink) for target, span, indices in jobs]
        try:
            for future in futures:
                future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            wait(futures)
            raise
        return len(jobs)

    def _stream_span(
        self, target: S3Uri, span: CoalescedRange, indices: list[int], sink: Callable[[int, memoryview], None]
    ) -> None:
        """GET one span as a stream and hand each member range to `sink` once its bytes are in.

        A retried attempt resumes at the first member not yet delivered.
        """
        members = span.members  # sorted by offset in the span; all of positive length
        delivered = 0

        def attempt() -> None:
            nonlocal delivered
            start = members[delivered][1]
            response = self._client.get_object(
                target.bucket, target.key, offset=span.offset + start, length=span.length - start
            )
            position = start  # span offset of the next byte the stream yields
            partial = bytearray()  # the leading bytes of a member cut by a piece boundary
            try:
                for piece in response.stream(STREAM_CHUNK_BYTES):
                    with memoryview(piece) as view:
                        delivered = self._deliver(view, position, partial, members, delivered, indices, sink)
                    position += len(piece)
            finally:
                response.close()
                response.release_conn()
            if delivered < len(members):
                raise InvalidArgumentError(str(target), f"object ends before byte {span.offset + span.length}")

        self._retrying("get range", target, attempt)

    @staticmethod
    def _deliver(
        view: memoryview,
        position: int,
        partial: bytearray,
        members: tuple[tuple[int, int, int], ...],
        delivered: int,
        indices: list[int],
        sink: Callable[[int, memoryview], None],
    ) -> int:
        """Hand to `sink` every member completed by the piece `view` (span bytes from `position`).

        Members inside the piece are passed as views of it, without a copy; only a member cut by the piece's end
        is gathered in `partial`. Members never overlap (see :func:`coalesce_ranges`). Returns the number of members
        delivered so far.
        """
        end = position + len(view)
        while delivered < len(members):
            member, offset, length = members[delivered]
            if partial:
                # The member that began in an earlier piece: this piece starts right where `partial` ends.
                partial += view[: length - len(partial)]
                if len(partial) < length:
                    return delivered
                with memoryview(partial) as whole:
                    sink(indices[member], whole)
                partial.clear()
            elif offset + length <= end:
                sink(indices[member], view[offset - position : offset - position + length])
            else:
                if offset < end:
                    partial += view[offset - position :]
                return delivered
            delivered += 1
        return delivered

    def _read(self, target: S3Uri, offset: int, length: int) -> bytes:
        response = self._client.get_object(target.bucket, target.key, offset=offset, length=length)
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()

    def stat(self, uri: UriLike) -> ObjectInfo:
        """Size, ETag and modification time of the object at `uri`."""
        target = self._object_uri(uri)
        result = self._retrying("stat", target, lambda: self._client.stat_object(target.bucket, target.key))
        return ObjectInfo(target, int(result.size or 0), result.etag or "", result.last_modified)

    def exists(self, uri: UriLike) -> bool:
        """True when an object exists at `uri` (False also when its bucket does not exist)."""
        try:
            self.stat(uri)
        except NotFoundError:
            return False
        return True

    def list(self, prefix_uri: UriLike, recursive: bool = True) -> list[ObjectInfo]:
        """Objects under the folder `prefix_uri` (a key without a trailing '/' is taken as a folder), sorted by key.

        With ``recursive=False`` only the objects directly in the folder are returned (no sub-folders).
        """
        target = self._uri(prefix_uri)

        def fetch() -> list[ObjectInfo]:
            entries = self._client.list_objects(target.bucket, prefix=target.folder_key, recursive=recursive)
            return [
                ObjectInfo(S3Uri(target.bucket, entry.object_name), int(entry.size or 0), entry.etag or "",
                           entry.last_modified)
                for entry in entries
                if not entry.is_dir
            ]

        return sorted(self._retrying("list", target, fetch), key=lambda info: info.uri.key)

    # -- deletes --------------------------------------------------------------------------------------------------

    def delete(self, uri: UriLike) -> None:
        """Delete the object at `uri`; deleting a missing object is not an error (a missing bucket is)."""
        target = self._object_uri(uri)
        self._retrying("delete", target, lambda: self._client.remove_object(target.bucket, target.key))

    def delete_prefix(self, prefix_uri: UriLike) -> int:
        """Delete every object under the folder `prefix_uri`; returns how many were deleted."""
        target = self._uri(prefix_uri)
        keys = [info.uri.key for info in self.list(target)]

        def remove() -> None:
            errors = list(self._client.remove_objects(target.bucket, (DeleteObject(key) for key in keys)))
            if errors:
                raise ObjectStoreError(f"delete under {target}: {errors[0].code}: {errors[0].message}")

        if keys:
            self._retrying("delete prefix", target, remove)
        return len(keys)


class MultipartUpload:
    """An S3 multipart upload in progress: parts go up with bounded concurrency, nothing is visible until complete.

    Parts may be submitted in any order (all but the last must be at least 5 MiB); each is retried on its own.
    Used as a context manager, an exception inside the block aborts the upload.
    """

    def __init__(self, store: ObjectStore, uri: S3Uri, content_type: str, max_in_flight: int = 2) -> None:
        self.store = store
        self.uri = uri
        self._client = store._client  # noqa: SLF001  (the SDK's multipart primitives are not public API)
        self._max_in_flight = max_in_flight
        self._etags: dict[int, str] = {}
        self._sizes: dict[int, int] = {}
        self._in_flight: deque[Future[None]] = deque()
        self._executor = ThreadPoolExecutor(max_in_flight, thread_name_prefix="cryostack-s3-upload")
        self._finished = False
        self.upload_id: str = store._retrying(  # noqa: SLF001
            "start multipart upload",
            uri,
            lambda: self._client._create_multipart_upload(  # noqa: SLF001
                uri.bucket, uri.key, {"Content-Type": content_type}
            ),
        )

    def __enter__(self) -> MultipartUpload:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        if exc_type is not None or not self._finished:
            self.abort()

    def submit_part(self, part_number: int, data: Bytes) -> None:
        """Queue part `part_number` (1-based) for upload, waiting while `max_in_flight` parts are in the air."""
        if not 1 <= part_number <= 10_000:
            raise InvalidArgumentError("part_number", f"{part_number} is outside 1..10000")
        while len(self._in_flight) >= self._max_in_flight:
            self._in_flight.popleft().result()
        payload = bytes(data)
        self._sizes[part_number] = len(payload)
        self._in_flight.append(self._executor.submit(self._upload, part_number, payload))

    def _upload(self, part_number: int, payload: bytes) -> None:
        etag = self.store._retrying(  # noqa: SLF001
            f"upload part {part_number} of",
            self.uri,
            lambda: self._client._upload_part(  # noqa: SLF001
                self.uri.bucket, self.uri.key, payload, None, self.upload_id, part_number
            ),
        )
        self._etags[part_number] = etag

    def complete(self) -> ObjectInfo:
        """Wait for every part, then assemble the object; returns its stat."""
        for future in self._in_flight:
            future.result()
        self._in_flight.clear()
        parts = [Part(number, self._etags[number]) for number in sorted(self._etags)]
        tries = 0

        def assemble() -> None:
            nonlocal tries
            tries += 1
            self._client._complete_multipart_upload(  # noqa: SLF001
                self.uri.bucket, self.uri.key, self.upload_id, parts
            )

        try:
            self.store._retrying("complete multipart upload", self.uri, assemble)  # noqa: SLF001
        except NotFoundError:
            # A retried completion finds the upload gone when the first one succeeded with its answer lost.
            if tries < 2:
                raise
        info = self.store.stat(self.uri)
        if info.size != sum(self._sizes.values()):
            raise ObjectStoreError(f"{self.uri}: assembled object has {info.size} bytes, "
                                   f"expected {sum(self._sizes.values())}")
        self._finished = True
        self._executor.shutdown(wait=True)
        return info

    def abort(self) -> None:
        """Cancel the upload and discard its parts (best effort: a failure is logged, not raised)."""
        if self._finished:
            return
        self._finished = True
        for future in self._in_flight:
            future.cancel()
        wait(self._in_flight)
        self._executor.shutdown(wait=True)
        try:
            self.store._retrying(  # noqa: SLF001
                "abort multipart upload",
                self.uri,
                lambda: self._client._abort_multipart_upload(  # noqa: SLF001
                    self.uri.bucket, self.uri.key, self.upload_id
                ),
            )
        except CryostackError as error:
            log.warning("could not abort multipart upload to %s: %s", self.uri, error)


def _read_up_to(readable: BinaryIO, size: int) -> bytes:
    """Read until `size` bytes or end of stream (a raw stream may return short reads)."""
    chunks = []
    remaining = size
    while remaining > 0:
        chunk = readable.read(remaining)
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _check_length(expected: int | None, actual: int) -> None:
    if expected is not None and expected != actual:
        raise InvalidArgumentError("length", f"stream yielded {actual} bytes, {expected} were announced")

