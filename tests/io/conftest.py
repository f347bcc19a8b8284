"""Fixtures of the I/O tests: snapshots of a bucket's contents and the real particle sets uploaded to it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from io_helpers import REAL_SETS

from cryostack.io.objectstore import ObjectStore
from cryostack.io.uri import S3Uri


@pytest.fixture
def snapshot(object_store: ObjectStore, bucket_uri: S3Uri) -> Callable[[], list[tuple[str, int, str]]]:
    """A function listing (key, size, etag) of every object in the test's bucket."""

    def take() -> list[tuple[str, int, str]]:
        return [(info.uri.key, info.size, info.etag) for info in object_store.list(bucket_uri)]

    return take


@pytest.fixture
def upload_real_set(
    object_store: ObjectStore, bucket_uri: S3Uri, shared_data_dir: Path
) -> Callable[[str], tuple[S3Uri, Path, Path]]:
    """Upload one of REAL_SETS under ``<bucket>/<name>/``; returns (STAR URI, local STAR path, local stack path)."""

    def upload(name: str) -> tuple[S3Uri, Path, Path]:
        star_name, stack_name = REAL_SETS[name]
        folder = shared_data_dir / "real-particles"
        for file_name in (star_name, stack_name):
            object_store.put_bytes(bucket_uri.join(name, file_name), (folder / file_name).read_bytes())
        return bucket_uri.join(name, star_name), folder / star_name, folder / stack_name

    return upload
