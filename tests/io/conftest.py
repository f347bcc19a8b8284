"""Fixtures of the I/O tests: snapshots of a bucket's contents."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from cryostack.io.objectstore import ObjectStore
from cryostack.io.uri import S3Uri


@pytest.fixture
def snapshot(object_store: ObjectStore, bucket_uri: S3Uri) -> Callable[[], list[tuple[str, int, str]]]:
    """A function listing (key, size, etag) of every object in the test's bucket."""

    def take() -> list[tuple[str, int, str]]:
        return [(info.uri.key, info.size, info.etag) for info in object_store.list(bucket_uri)]

    return take
