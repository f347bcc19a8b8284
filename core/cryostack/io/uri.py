"""Object URIs (``s3://bucket/key``) with the key rules every object-store access goes through.

An :class:`S3Uri` names either an object (``s3://bucket/jobs/42/particles.star``) or a folder-like prefix, written
with a trailing ``/`` (``s3://bucket/jobs/42/``) or as a bare bucket (``s3://bucket``). Keys are validated when a
URI is built, so a URI that exists is safe to use:

- no leading ``/``, no empty segment (``a//b``), no ``.`` or ``..`` segment;
- segments made of ``A-Z a-z 0-9 . _ - = + , @ ~`` only, each at most 255 characters, the key at most 1024 bytes;
- bucket names follow S3's rules (3-63 characters, lowercase letters, digits, ``.`` and ``-``).

Violations raise :class:`~cryostack.errors.InvalidArgumentError` naming the request field (``field`` argument,
``"uri"`` by default). :func:`check_bucket_allowed` enforces ``ObjectStoreSettings.allowed_buckets``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from cryostack.errors import InvalidArgumentError

SCHEME = "s3://"
MAX_KEY_BYTES = 1024
MAX_SEGMENT_CHARS = 255
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_SEGMENT = re.compile(r"^[A-Za-z0-9._\-=+,@~]+$")
_IPV4 = re.compile(r"^\d+\.\d+\.\d+\.\d+$")


def validate_bucket(bucket: str, field: str = "uri") -> str:
    """Return `bucket` if it is a valid S3 bucket name, else raise InvalidArgumentError."""
    if not _BUCKET.match(bucket) or ".." in bucket or _IPV4.match(bucket):
        raise InvalidArgumentError(
            field, f"bucket name {bucket[:80]!r} is not 3-63 lowercase letters, digits, '.' or '-'"
        )
    return bucket


def validate_key(key: str, field: str = "uri") -> str:
    """Return `key` if it is a safe object key or folder prefix (see the module docstring), else raise."""
    if key == "":
        return key
    if len(key.encode()) > MAX_KEY_BYTES:
        raise InvalidArgumentError(field, f"key is longer than {MAX_KEY_BYTES} bytes")
    if key.startswith("/"):
        raise InvalidArgumentError(field, f"key {key[:120]!r} starts with '/'")
    segments = key[:-1].split("/") if key.endswith("/") else key.split("/")
    for segment in segments:
        if segment == "":
            raise InvalidArgumentError(field, f"key {key[:120]!r} has an empty path segment")
        if segment in (".", ".."):
            raise InvalidArgumentError(field, f"key {key[:120]!r} has a {segment!r} path segment")
        if len(segment) > MAX_SEGMENT_CHARS:
            raise InvalidArgumentError(field, f"key {key[:120]!r} has a segment over {MAX_SEGMENT_CHARS} chars")
        if not _SEGMENT.match(segment):
            raise InvalidArgumentError(
                field, f"key {key[:120]!r} has characters outside A-Z a-z 0-9 . _ - = + , @ ~ in {segment[:60]!r}"
            )
    return key


@dataclass(frozen=True)
class S3Uri:
    """A validated ``s3://bucket/key`` URI; a key ending in ``/`` (or empty) names a folder-like prefix."""

    bucket: str
    key: str = ""

    def __post_init__(self) -> None:
        validate_bucket(self.bucket)
        validate_key(self.key)

    @classmethod
    def parse(cls, text: str, field: str = "uri") -> S3Uri:
        """Parse ``s3://bucket/key``; errors name `field`."""
        if not isinstance(text, str) or not text.startswith(SCHEME):
            raise InvalidArgumentError(field, f"{str(text)[:120]!r} is not an s3://bucket/key URI")
        bucket, _, key = text[len(SCHEME) :].partition("/")
        validate_bucket(bucket, field)
        validate_key(key, field)
        return cls(bucket, key)

    @classmethod
    def coerce(cls, uri: S3Uri | str, field: str = "uri") -> S3Uri:
        """Return `uri` unchanged if it is an S3Uri, else parse it."""
        return uri if isinstance(uri, S3Uri) else cls.parse(uri, field)

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.key}" if self.key else f"{SCHEME}{self.bucket}"

    @property
    def is_prefix(self) -> bool:
        """True when this URI names a folder-like prefix (empty key or key ending in '/')."""
        return self.key == "" or self.key.endswith("/")

    @property
    def folder_key(self) -> str:
        """The key as a listing prefix: empty for the bucket, else ending in '/'."""
        return self.key if self.is_prefix else self.key + "/"

    def join(self, *parts: str) -> S3Uri:
        """This URI treated as a folder, extended by `parts` (each may contain '/'; empty parts are skipped)."""
        tail = "/".join(part for part in parts if part)
        return S3Uri(self.bucket, self.folder_key + tail)

    @property
    def parent(self) -> S3Uri:
        """The folder that contains this object or prefix (the bucket root at the top)."""
        stripped = self.key.rstrip("/")
        head, sep, _ = stripped.rpartition("/")
        return S3Uri(self.bucket, head + sep)

    @property
    def name(self) -> str:
        """The last path segment (without a trailing '/'); empty for the bucket root."""
        return self.key.rstrip("/").rpartition("/")[2]

    def require_object(self, field: str = "uri") -> S3Uri:
        """Return self if it names an object rather than a prefix, else raise InvalidArgumentError."""
        if self.is_prefix:
            raise InvalidArgumentError(field, f"{self} names a folder, not an object")
        return self


def resolve_reference(base: S3Uri, reference: str, field: str = "uri") -> S3Uri:
    """Resolve a path found inside a file: an absolute ``s3://`` URI, or a key relative to the folder `base`.

    Leading ``./`` segments of a relative path are dropped; ``..`` is refused like everywhere else.
    """
    if reference.startswith(SCHEME):
        return S3Uri.parse(reference, field).require_object(field)
    relative = reference
    while relative.startswith("./"):
        relative = relative[2:]
    try:
        return base.join(relative).require_object(field)
    except InvalidArgumentError as error:
        raise InvalidArgumentError(field, f"reference {reference[:120]!r}: {error.reason}") from None


def check_bucket_allowed(uri: S3Uri, allowed_buckets: Iterable[str], field: str = "uri") -> S3Uri:
    """Return `uri` if its bucket is allowed (an empty allow-list allows every bucket), else raise."""
    allowed = list(allowed_buckets)
    if allowed and uri.bucket not in allowed:
        raise InvalidArgumentError(field, f"bucket {uri.bucket!r} is not one of the allowed buckets")
    return uri
