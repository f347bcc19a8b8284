"""S3 URIs: parsing, joining, key validation and the allowed-bucket rule (the latter against the real store)."""

from __future__ import annotations

import pytest

from cryostack.errors import InvalidArgumentError
from cryostack.io.objectstore import ObjectStore
from cryostack.io.uri import S3Uri, check_bucket_allowed, resolve_reference


def test_parse_and_format_round_trip():
    uri = S3Uri.parse("s3://my-bucket/jobs/42/particles.star")
    assert (uri.bucket, uri.key) == ("my-bucket", "jobs/42/particles.star")
    assert str(uri) == "s3://my-bucket/jobs/42/particles.star"
    assert uri.name == "particles.star"
    assert uri.parent == S3Uri("my-bucket", "jobs/42/")
    assert uri.parent.parent.parent == S3Uri("my-bucket")
    assert str(S3Uri.parse("s3://my-bucket")) == "s3://my-bucket"
    assert S3Uri.parse("s3://my-bucket/") == S3Uri("my-bucket", "")


def test_folders_keep_their_trailing_slash_and_join_treats_objects_as_folders():
    root = S3Uri.parse("s3://b-1/jobs/")
    assert root.is_prefix and str(root) == "s3://b-1/jobs/"
    assert str(root.join("abc/", "")) == "s3://b-1/jobs/abc/"
    assert str(root.join("abc", "out/map.mrc")) == "s3://b-1/jobs/abc/out/map.mrc"
    assert str(S3Uri("b-1", "jobs").join("x")) == "s3://b-1/jobs/x"
    assert str(S3Uri("b-1").join("x")) == "s3://b-1/x"
    assert S3Uri("b-1", "a/b").folder_key == "a/b/"
    assert S3Uri("b-1", "a/b/").name == "b"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("s3://bucket/a/../b", "'..'"),
        ("s3://bucket/../b", "'..'"),
        ("s3://bucket/a/./b", "'.'"),
        ("s3://bucket/a//b", "empty path segment"),
        ("s3://bucket//a", "starts with '/'"),
        ("s3://bucket/a b", "characters outside"),
        ("s3://bucket/a\nb", "characters outside"),
        ("s3://bucket/a%2e%2e", "characters outside"),
        ("s3://bucket/" + "k" * 256, "segment over"),
        ("s3://bucket/" + "/".join(["abcdefgh"] * 120), "longer than 1024"),
        ("s3://Bucket/a", "bucket name"),
        ("s3://ab/a", "bucket name"),
        ("s3://a..b/a", "bucket name"),
        ("s3://192.168.1.1/a", "bucket name"),
        ("http://bucket/a", "not an s3://bucket/key URI"),
        ("bucket/a", "not an s3://bucket/key URI"),
    ],
)
def test_unsafe_uris_are_refused_naming_the_field(text, reason):
    with pytest.raises(InvalidArgumentError) as caught:
        S3Uri.parse(text, field="input_uri")
    assert caught.value.field == "input_uri"
    assert reason in caught.value.reason


def test_the_constructor_validates_too():
    with pytest.raises(InvalidArgumentError):
        S3Uri("bucket", "../etc/passwd")
    with pytest.raises(InvalidArgumentError):
        S3Uri("bucket", "a").join("..", "b")


def test_references_resolve_relative_to_a_folder_or_as_absolute_uris():
    base = S3Uri.parse("s3://data/sets/one/")
    assert resolve_reference(base, "stacks/a.mrcs") == S3Uri("data", "sets/one/stacks/a.mrcs")
    assert resolve_reference(base, "./stacks/a.mrcs") == S3Uri("data", "sets/one/stacks/a.mrcs")
    assert resolve_reference(base, "s3://other/x.mrcs") == S3Uri("other", "x.mrcs")
    with pytest.raises(InvalidArgumentError, match="reference '../x.mrcs'"):
        resolve_reference(base, "../x.mrcs")
    with pytest.raises(InvalidArgumentError, match="names a folder"):
        resolve_reference(base, "stacks/")


def test_allowed_buckets_are_enforced_before_any_request(object_store_settings, bucket):
    assert check_bucket_allowed(S3Uri("a-b-c", "k"), []) == S3Uri("a-b-c", "k")
    with pytest.raises(InvalidArgumentError, match="not one of the allowed buckets"):
        check_bucket_allowed(S3Uri("a-b-c", "k"), ["other"])
    restricted = ObjectStore(object_store_settings.model_copy(update={"allowed_buckets": [bucket]}))
    restricted.put_bytes(S3Uri(bucket, "ok.txt"), b"fine")
    assert restricted.get_bytes(f"s3://{bucket}/ok.txt") == b"fine"
    with pytest.raises(InvalidArgumentError, match="not one of the allowed buckets"):
        restricted.put_bytes("s3://somebody-elses-bucket/x", b"no")
    with pytest.raises(InvalidArgumentError, match="not one of the allowed buckets"):
        restricted.list("s3://somebody-elses-bucket")


def test_object_operations_refuse_folder_uris(object_store, bucket_uri):
    with pytest.raises(InvalidArgumentError, match="names a folder"):
        object_store.put_bytes(bucket_uri.join("folder/"), b"x")
    with pytest.raises(InvalidArgumentError, match="names a folder"):
        object_store.get_bytes(bucket_uri)


def test_settings_repr_and_store_repr_hide_credentials(object_store, object_store_settings):
    secret = object_store_settings.secret_key.get_secret_value()
    assert secret
    assert secret not in repr(object_store_settings)
    assert secret not in repr(object_store) and secret not in str(object_store.settings)
