"""ObjectStore against the real SeaweedFS: reads, writes, ranges, multipart, conditional create, errors, auth."""

from __future__ import annotations

import io
import logging
import threading

import numpy as np
import pytest
from pydantic import SecretStr

from cryostack.errors import InvalidArgumentError, NotFoundError
from cryostack.io.objectstore import ObjectStore, ObjectStoreAuthError, coalesce_ranges
from cryostack.io.uri import S3Uri

MIB = 1024 * 1024


def test_put_get_stat_list_delete(object_store, bucket_uri):
    uri = bucket_uri.join("a/b/c.bin")
    info = object_store.put_bytes(uri, b"hello world", content_type="text/plain")
    assert info.size == 11
    assert object_store.get_bytes(uri) == b"hello world"
    stat = object_store.stat(str(uri))
    assert (stat.size, stat.etag) == (11, info.etag)
    assert stat.last_modified is not None
    assert object_store.exists(uri)
    object_store.put_bytes(bucket_uri.join("a/top.bin"), b"1")
    object_store.put_bytes(bucket_uri.join("ab.bin"), b"2")
    assert [i.uri.key for i in object_store.list(bucket_uri.join("a"))] == ["a/b/c.bin", "a/top.bin"]
    assert [i.uri.key for i in object_store.list(bucket_uri.join("a/"), recursive=False)] == ["a/top.bin"]
    assert [i.uri.key for i in object_store.list(bucket_uri)] == ["a/b/c.bin", "a/top.bin", "ab.bin"]
    object_store.delete(uri)
    object_store.delete(uri)  # deleting what is gone is fine
    assert not object_store.exists(uri)
    assert object_store.delete_prefix(bucket_uri.join("a")) == 1
    assert [i.uri.key for i in object_store.list(bucket_uri)] == ["ab.bin"]


def test_missing_objects_and_buckets_are_not_found(object_store, bucket_uri):
    missing = bucket_uri.join("nope.star")
    for call in (object_store.get_bytes, object_store.stat, lambda u: object_store.get_range(u, 0, 10)):
        with pytest.raises(NotFoundError) as caught:
            call(missing)
        assert caught.value.name == str(missing)
    with pytest.raises(NotFoundError, match="no such bucket"):
        object_store.get_bytes("s3://cryostack-no-such-bucket-x/a")
    with pytest.raises(NotFoundError, match="no such bucket"):
        object_store.list("s3://cryostack-no-such-bucket-x")
    assert not object_store.exists(missing)
    assert not object_store.bucket_exists("cryostack-no-such-bucket-x")


def test_get_range_and_out_of_range_requests(object_store, bucket_uri):
    data = bytes(range(256)) * 40
    uri = bucket_uri.join("r.bin")
    object_store.put_bytes(uri, data)
    assert object_store.get_range(uri, 1000, 300) == data[1000:1300]
    assert object_store.get_range(uri, 5, 0) == b""
    with pytest.raises(InvalidArgumentError, match="ends before byte"):
        object_store.get_range(uri, len(data) - 10, 20)
    with pytest.raises(InvalidArgumentError, match="outside the object"):
        object_store.get_range(uri, len(data) + 10, 5)
    with pytest.raises(InvalidArgumentError, match="non-negative"):
        object_store.get_range(uri, -1, 5)


def test_get_ranges_returns_each_range_in_order_with_coalesced_requests(object_store, bucket_uri):
    rng = np.random.default_rng(3)
    data = rng.integers(0, 256, size=3 * MIB, dtype=np.uint8).tobytes()
    uri = bucket_uri.join("ranges.bin")
    object_store.put_bytes(uri, data)
    ranges = [(int(o), int(n)) for o, n in zip(rng.integers(0, len(data) - 5000, 200), rng.integers(0, 5000, 200))]
    ranges += [ranges[0], (0, 0), (len(data) - 1, 1)]  # a duplicate, an empty range, the last byte
    assert object_store.get_ranges(uri, ranges) == [data[o : o + n] for o, n in ranges]

    adjacent = [(i * 1000, 1000) for i in reversed(range(100))]
    received: dict[int, bytes] = {}
    requests = object_store.read_ranges([(uri, o, n) for o, n in adjacent], lambda i, v: received.update({i: bytes(v)}))
    assert requests == 1
    assert [received[i] for i in range(100)] == [data[o : o + n] for o, n in adjacent]


def test_coalescing_respects_gap_and_span_limits():
    ranges = [(0, 10), (10, 10), (25, 5), (100, 10), (112, 2), (105, 2)]
    spans = coalesce_ranges(ranges, max_gap_bytes=5, max_span_bytes=1000)
    # (105, 2) overlaps (100, 10): it starts a span of its own, so that no span holds overlapping ranges.
    assert [(s.offset, s.length) for s in spans] == [(0, 30), (100, 10), (105, 9)]
    assert spans[0].members == ((0, 0, 10), (1, 10, 10), (2, 25, 5))
    assert spans[1].members == ((3, 0, 10),)
    assert spans[2].members == ((5, 0, 2), (4, 7, 2))
    assert len(coalesce_ranges(ranges, max_gap_bytes=0, max_span_bytes=1000)) == 5
    capped = coalesce_ranges(ranges, max_gap_bytes=100, max_span_bytes=20)
    assert [(s.offset, s.length) for s in capped] == [(0, 20), (25, 5), (100, 10), (105, 9)]
    assert coalesce_ranges([], 10, 10) == []


def test_multipart_stream_larger_than_a_part(object_store_settings, bucket_uri):
    store = ObjectStore(object_store_settings.model_copy(update={"part_size_bytes": 5 * MIB}))
    data = np.random.default_rng(1).integers(0, 256, size=12 * MIB + 123, dtype=np.uint8).tobytes()
    uri = bucket_uri.join("big.bin")
    info = store.put_stream(uri, io.BufferedReader(io.BytesIO(data), buffer_size=65536), len(data))
    assert info.size == len(data) and info.etag.endswith("-3")  # three parts
    assert store.get_bytes(uri) == data
    assert store.get_range(uri, 5 * MIB - 10, 20) == data[5 * MIB - 10 : 5 * MIB + 10]
    assert store.put_bytes(bucket_uri.join("big2.bin"), data).size == len(data)


def test_a_stream_shorter_than_announced_stores_nothing(object_store_settings, bucket_uri, snapshot):
    store = ObjectStore(object_store_settings.model_copy(update={"part_size_bytes": 5 * MIB}))
    before = snapshot()
    for size in (6 * MIB, 1000):
        with pytest.raises(InvalidArgumentError, match="were announced"):
            store.put_stream(bucket_uri.join("short.bin"), io.BytesIO(bytes(size)), size + 1)
    assert snapshot() == before


def test_an_aborted_multipart_upload_leaves_nothing(object_store_settings, bucket_uri, snapshot):
    store = ObjectStore(object_store_settings.model_copy(update={"part_size_bytes": 5 * MIB}))
    uri = bucket_uri.join("aborted.bin")
    with pytest.raises(RuntimeError), store.begin_multipart(uri) as upload:
        upload.submit_part(1, bytes(5 * MIB))
        raise RuntimeError("writer failed")
    assert snapshot() == []
    assert not store.exists(uri)


def test_put_if_absent_creates_once_even_under_a_race(object_store, bucket_uri):
    uri = bucket_uri.join("claims/attempt-1")
    assert object_store.put_if_absent(uri, b"first") is True
    assert object_store.put_if_absent(uri, b"second") is False
    assert object_store.get_bytes(uri) == b"first"

    winners: list[int] = []
    barrier = threading.Barrier(8)

    def claim(worker: int) -> None:
        barrier.wait()
        if object_store.put_if_absent(bucket_uri.join("claims/raced"), f"{worker}".encode()):
            winners.append(worker)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(winners) == 1
    assert object_store.get_bytes(bucket_uri.join("claims/raced")) == f"{winners[0]}".encode()
    assert [i.uri.key for i in object_store.list(bucket_uri)] == ["claims/attempt-1", "claims/raced"]


@pytest.mark.parametrize(
    ("access_key", "secret_key", "code"),
    [
        (None, "wrong-secret", "SignatureDoesNotMatch"),
        ("CSNOSUCHKEY000000000", "wrong-secret", "InvalidAccessKeyId"),
        ("", "", "AccessDenied"),
    ],
)
def test_wrong_credentials_are_refused_at_once(object_store_settings, bucket_uri, caplog, access_key, secret_key, code):
    update = {"secret_key": SecretStr(secret_key), "backoff_initial_s": 30.0, "max_attempts": 5}
    if access_key is not None:
        update["access_key"] = SecretStr(access_key)
    settings = object_store_settings.model_copy(update=update)
    store = ObjectStore(settings)
    with caplog.at_level(logging.WARNING, logger="cryostack.io.objectstore"):
        with pytest.raises(ObjectStoreAuthError) as caught:
            store.put_bytes(bucket_uri.join("x"), b"x")
        assert code in str(caught.value)
        with pytest.raises(ObjectStoreAuthError):
            store.stat(bucket_uri.join("x"))
    assert not [record for record in caplog.records if "retrying" in record.getMessage()]
    real_secret = object_store_settings.secret_key.get_secret_value()
    assert real_secret not in str(caught.value) and "wrong-secret" not in str(caught.value)


def test_ensure_bucket_is_idempotent_and_remove_bucket_needs_an_empty_bucket(object_store):
    name = "cryostack-test-bucket-lifecycle"
    object_store.ensure_bucket(name)
    object_store.ensure_bucket(name)
    assert object_store.bucket_exists(name)
    object_store.put_bytes(S3Uri(name, "x"), b"1")
    assert object_store.delete_prefix(S3Uri(name)) == 1
    object_store.remove_bucket(name)
    assert not object_store.bucket_exists(name)
