"""SPEC §3 bad inputs: each is refused with an error naming the object or field, and the store is left unchanged."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import starfile
from io_helpers import random_images

from cryostack.errors import InvalidArgumentError, NotFoundError
from cryostack.io.mrc import HEADER_BYTES, encode_mrc
from cryostack.io.objectstore import ObjectStore
from cryostack.io.particles import ParticleStackReader, write_stack
from cryostack.io.star import REQUIRED_OPTICS_COLUMNS, REQUIRED_PARTICLE_COLUMNS, read_star, subset_indices, write_star
from cryostack.io.uri import S3Uri

BOX = 12
N = 6


def optics_frame(**changes: list) -> pd.DataFrame:
    columns = {
        "rlnOpticsGroup": [1, 2], "rlnOpticsGroupName": ["g1", "g2"], "rlnVoltage": [300.0, 300.0],
        "rlnSphericalAberration": [2.7, 2.7], "rlnAmplitudeContrast": [0.1, 0.1], "rlnImagePixelSize": [1.5, 1.5],
        "rlnImageSize": [BOX, BOX],
    }
    return pd.DataFrame({**columns, **changes})


def particles_frame(**changes: list) -> pd.DataFrame:
    columns = {
        "rlnImageName": [f"{i + 1}@stack.mrcs" for i in range(N)], "rlnDefocusU": np.linspace(1e4, 2e4, N),
        "rlnDefocusV": np.linspace(1e4, 2e4, N), "rlnDefocusAngle": np.zeros(N), "rlnOpticsGroup": [1, 1, 1, 2, 2, 2],
    }
    return pd.DataFrame({**columns, **changes})


def star_text(optics: pd.DataFrame, particles: pd.DataFrame) -> bytes:
    return starfile.to_string({"optics": optics, "particles": particles}).encode()


def relay(store: ObjectStore, star_uri: S3Uri, out: S3Uri) -> None:
    """What every stage does with its input: read and check all of it, then write outputs."""
    reader = ParticleStackReader.from_star(store, star_uri)
    images = np.concatenate([batch for _, batch in reader.iter_batches(batch_size=4)])
    write_stack(store, out.join("images.mrcs"), images, 1.5)
    write_star(store, out.join("particles.star"), reader.table.with_columns({"rlnClassNumber": 1}))


@pytest.fixture
def good_inputs(object_store, bucket_uri):
    """A valid STAR + stack under `<bucket>/in/`; returns the STAR URI after checking that it relays fine."""
    object_store.put_bytes(bucket_uri.join("in/stack.mrcs"), encode_mrc(random_images(N, BOX), 1.5, is_stack=True))
    object_store.put_bytes(bucket_uri.join("in/particles.star"), star_text(optics_frame(), particles_frame()))
    relay(object_store, bucket_uri.join("in/particles.star"), bucket_uri.join("ok/"))
    object_store.delete_prefix(bucket_uri.join("ok/"))
    return bucket_uri.join("in/particles.star")


def refused(object_store, bucket_uri, snapshot, error_type, star_uri=None):
    """Run the relay on the bad input; return the error after checking that nothing was written."""
    before = snapshot()
    with pytest.raises(error_type) as caught:
        relay(object_store, star_uri or bucket_uri.join("in/particles.star"), bucket_uri.join("out/"))
    assert snapshot() == before
    return caught.value


def test_missing_star_object_is_not_found(object_store, bucket_uri, snapshot, good_inputs):
    error = refused(object_store, bucket_uri, snapshot, NotFoundError, bucket_uri.join("in/missing.star"))
    assert error.name == str(bucket_uri.join("in/missing.star"))


def test_missing_stack_object_is_not_found(object_store, bucket_uri, snapshot, good_inputs):
    object_store.delete(bucket_uri.join("in/stack.mrcs"))
    error = refused(object_store, bucket_uri, snapshot, NotFoundError)
    assert error.name == str(bucket_uri.join("in/stack.mrcs"))


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda raw: raw[:-100], "truncated MRC"),
        (lambda raw: raw[: HEADER_BYTES - 24], "fewer than an MRC header"),
        (lambda raw: raw[:12] + np.int32(77).tobytes() + raw[16:], "corrupt MRC header"),
        (lambda raw: raw[:8] + np.int32(N + 3).tobytes() + raw[12:], "truncated MRC"),
        (lambda raw: raw[:8] + np.int32(N - 1).tobytes() + raw[12:], "more than the"),
        (lambda raw: b"\x07" * len(raw), "corrupt MRC header"),
    ],
)
def test_truncated_or_corrupt_stacks_are_refused(object_store, bucket_uri, snapshot, good_inputs, damage, reason):
    stack = bucket_uri.join("in/stack.mrcs")
    object_store.put_bytes(stack, damage(object_store.get_bytes(stack)))
    error = refused(object_store, bucket_uri, snapshot, InvalidArgumentError)
    assert error.field == str(stack) and reason in error.reason


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_pixels_are_refused(object_store, bucket_uri, snapshot, good_inputs, bad):
    stack = bucket_uri.join("in/stack.mrcs")
    images = random_images(N, BOX)
    images[4, 1, 2] = bad
    header = encode_mrc(random_images(N, BOX), 1.5, is_stack=True)[:HEADER_BYTES]  # the encoder refuses NaN itself
    object_store.put_bytes(stack, header + images.tobytes())
    error = refused(object_store, bucket_uri, snapshot, InvalidArgumentError)
    assert error.field == str(stack) and "image 5 (1-based) contains NaN or Inf" in error.reason


def test_writers_refuse_non_finite_images_before_writing(object_store, bucket_uri, snapshot):
    images = random_images(N, BOX)
    images[-1, 0, 0] = np.nan
    before = snapshot()
    with pytest.raises(InvalidArgumentError, match="image 6"):
        write_stack(object_store, bucket_uri.join("out/s.mrcs"), images, 1.5)
    assert snapshot() == before


@pytest.mark.parametrize("column", REQUIRED_PARTICLE_COLUMNS + REQUIRED_OPTICS_COLUMNS + ("rlnOpticsGroup",))
def test_star_without_a_required_column_is_refused(object_store, bucket_uri, snapshot, good_inputs, column):
    optics, particles = optics_frame(), particles_frame()
    if column in optics.columns:
        optics = optics.drop(columns=[column])
    else:
        particles = particles.drop(columns=[column])
    object_store.put_bytes(good_inputs, star_text(optics, particles))
    error = refused(object_store, bucket_uri, snapshot, InvalidArgumentError)
    assert error.field == f"{good_inputs}:{column}" and "missing" in error.reason


@pytest.mark.parametrize(
    ("optics", "particles", "column", "reason"),
    [
        ({"rlnImagePixelSize": [1.5, 0.0]}, {}, "rlnImagePixelSize", "non-positive"),
        ({"rlnImagePixelSize": [-1.0, 1.5]}, {}, "rlnImagePixelSize", "non-positive"),
        ({"rlnVoltage": [300.0, 0.0]}, {}, "rlnVoltage", "non-positive"),
        ({"rlnVoltage": [-300.0, 300.0]}, {}, "rlnVoltage", "non-positive"),
        ({"rlnImageSize": [BOX, BOX + 2]}, {}, "rlnImageSize", "inconsistent box sizes"),
        ({"rlnAmplitudeContrast": [0.1, 1.5]}, {}, "rlnAmplitudeContrast", "[0, 1)"),
        ({}, {"rlnDefocusU": [1e4, np.nan, 1e4, 1e4, 1e4, 1e4]}, "rlnDefocusU", "NaN or Inf"),
        ({}, {"rlnDefocusAngle": [0, 0, 0, np.inf, 0, 0]}, "rlnDefocusAngle", "NaN or Inf"),
        ({"rlnSphericalAberration": [2.7, np.nan]}, {}, "rlnSphericalAberration", "NaN or Inf"),
        ({}, {"rlnOpticsGroup": [1, 1, 1, 2, 2, 3]}, "rlnOpticsGroup", "absent from data_optics"),
        ({}, {"rlnImageName": ["1@stack.mrcs"] * 5 + ["stack.mrcs"]}, "rlnImageName", "row 5"),
        ({}, {"rlnImageName": ["0@stack.mrcs"] + ["1@stack.mrcs"] * 5}, "rlnImageName", "row 0"),
    ],
)
def test_star_with_invalid_values_is_refused(object_store, bucket_uri, snapshot, good_inputs, optics, particles,
                                             column, reason):
    object_store.put_bytes(good_inputs, star_text(optics_frame(**optics), particles_frame(**particles)))
    error = refused(object_store, bucket_uri, snapshot, InvalidArgumentError)
    assert error.field == f"{good_inputs}:{column}"
    assert reason in error.reason


def test_stack_box_size_must_match_the_star(object_store, bucket_uri, snapshot, good_inputs):
    object_store.put_bytes(bucket_uri.join("in/stack.mrcs"),
                           encode_mrc(random_images(N, BOX + 1), 1.5, is_stack=True))
    error = refused(object_store, bucket_uri, snapshot, InvalidArgumentError)
    assert error.field == str(bucket_uri.join("in/stack.mrcs")) and "box size" in error.reason


def test_stacks_with_different_box_sizes_are_refused(object_store, bucket_uri, snapshot, good_inputs):
    names = [f"{i + 1}@stack.mrcs" for i in range(3)] + [f"{i + 1}@other.mrcs" for i in range(3)]
    object_store.put_bytes(bucket_uri.join("in/other.mrcs"), encode_mrc(random_images(3, BOX + 2), 1.5, is_stack=True))
    object_store.put_bytes(good_inputs, star_text(optics_frame(), particles_frame(rlnImageName=names)))
    error = refused(object_store, bucket_uri, snapshot, InvalidArgumentError)
    assert error.field == str(bucket_uri.join("in/other.mrcs")) and "box size" in error.reason


def test_image_numbers_beyond_the_stack_are_refused(object_store, bucket_uri, snapshot, good_inputs):
    names = [f"{i + 1}@stack.mrcs" for i in range(N - 1)] + [f"{N + 3}@stack.mrcs"]
    object_store.put_bytes(good_inputs, star_text(optics_frame(), particles_frame(rlnImageName=names)))
    error = refused(object_store, bucket_uri, snapshot, InvalidArgumentError)
    assert error.field == str(bucket_uri.join("in/stack.mrcs")) and f"image {N + 3}" in error.reason


def test_an_object_that_is_not_a_star_file_is_refused(object_store, bucket_uri, snapshot, good_inputs):
    object_store.put_bytes(good_inputs, bytes(range(256)) * 4)
    error = refused(object_store, bucket_uri, snapshot, InvalidArgumentError)
    assert error.field.startswith(str(good_inputs))


def test_a_subset_larger_than_the_set_is_refused(object_store, good_inputs):
    table = read_star(object_store, good_inputs)
    with pytest.raises(InvalidArgumentError) as caught:
        subset_indices(len(table), count=len(table) + 1, seed=0)
    assert caught.value.field == "subset.count" and "larger than the set" in caught.value.reason
    with pytest.raises(InvalidArgumentError, match="7 indices for a set of 6") as caught:
        subset_indices(len(table), indices=np.arange(7))
    with pytest.raises(InvalidArgumentError) as caught:
        subset_indices(len(table), indices=np.array([0, 6]))
    assert caught.value.field == "subset.indices"
    reader = ParticleStackReader.from_star(object_store, good_inputs)
    with pytest.raises(InvalidArgumentError) as caught:
        reader.read([0, N])
    assert caught.value.field == "indices"
    with pytest.raises(InvalidArgumentError, match="indices must lie"):
        table.take([N])
