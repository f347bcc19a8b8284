"""MRC codec: written files pass mrcfile's strict validation; reads equal mrcfile's for every supported mode."""

from __future__ import annotations

import io
import warnings

import mrcfile
import numpy as np
import pytest
from io_helpers import random_images

from cryostack.errors import InvalidArgumentError
from cryostack.io.mrc import (
    HEADER_BYTES,
    RunningStats,
    check_size,
    decode_mrc,
    encode_mrc,
    parse_header,
    read_mrc,
    read_mrc_file,
    write_mrc,
    write_mrc_file,
)


def strict_open(path):
    """Open with mrcfile in strict mode, turning any warning into a failure."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return mrcfile.open(path, permissive=False)


@pytest.mark.parametrize("box", [31, 32])
def test_written_volume_is_strictly_valid_with_voxel_size_origin_and_statistics(tmp_path, box):
    volume = random_images(box, box, seed=box) * 3 + 1  # (D, D, D) float32
    path = tmp_path / "map.mrc"
    write_mrc_file(path, volume, 1.7, origin_a=(-4.0, 2.5, 8.0))
    report = io.StringIO()
    assert mrcfile.validate(str(path), print_file=report), report.getvalue()
    with strict_open(path) as mrc:
        assert mrc.is_volume()
        np.testing.assert_array_equal(mrc.data, volume)
        assert mrc.voxel_size.tolist() == pytest.approx([1.7] * 3)
        assert (mrc.header.origin.x, mrc.header.origin.y, mrc.header.origin.z) == (-4.0, 2.5, 8.0)
        assert float(mrc.header.dmin) == volume.min() and float(mrc.header.dmax) == volume.max()
        assert float(mrc.header.dmean) == pytest.approx(volume.mean(dtype=np.float64), rel=1e-6)
        assert float(mrc.header.rms) == pytest.approx(volume.std(dtype=np.float64), rel=1e-6)


def test_written_stack_uses_the_image_stack_convention(tmp_path):
    images = random_images(7, 33, seed=1)
    path = tmp_path / "s.mrcs"
    write_mrc_file(path, images, 2.0, is_stack=True)
    assert mrcfile.validate(str(path), print_file=io.StringIO())
    with strict_open(path) as mrc:
        assert mrc.is_image_stack() and mrc.voxel_size.x == pytest.approx(2.0)
        np.testing.assert_array_equal(mrc.data, images)


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.uint16, np.float16, np.float32])
@pytest.mark.parametrize("byte_order", ["<", ">"])
def test_reads_every_supported_mode_in_either_byte_order_like_mrcfile(tmp_path, dtype, byte_order):
    rng = np.random.default_rng(5)
    data = (rng.standard_normal((3, 10, 11)) * 20).astype(dtype)
    path = tmp_path / "m.mrcs"
    with mrcfile.new(str(path)) as mrc:
        mrc.set_data(data.astype(np.dtype(dtype).newbyteorder(byte_order)))
        mrc.voxel_size = 1.25
    decoded = read_mrc_file(path)
    with mrcfile.open(str(path)) as mrc:
        expected = mrc.data.astype(np.float32)
    assert decoded.data.dtype == np.float32 and decoded.data.shape == (3, 10, 11)
    np.testing.assert_array_equal(decoded.data, expected)
    if np.dtype(dtype).itemsize > 1:  # single-byte data carries no byte order of its own
        assert decoded.header.byte_order == byte_order
    assert decoded.header.voxel_size_a == pytest.approx((1.25, 1.25, 1.25))


def test_real_files_decode_like_mrcfile(shared_data_dir):
    paths = sorted((shared_data_dir / "real-particles").glob("*.mrc*")) + sorted((shared_data_dir / "maps").glob("*"))
    assert len(paths) >= 6
    for path in paths:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # relion31.mrcs has a blank identifier and machine stamp
            with mrcfile.open(str(path), permissive=True) as mrc:
                expected = mrc.data.reshape((-1, *mrc.data.shape[-2:]))
                voxel = mrc.voxel_size.x
        decoded = read_mrc_file(path)
        np.testing.assert_array_equal(decoded.data, expected, err_msg=str(path))
        assert decoded.header.voxel_size_a[0] == pytest.approx(float(voxel))


def test_map_round_trip_through_the_store_is_byte_exact(object_store, bucket_uri):
    volume = random_images(20, 20, seed=9)
    info = write_mrc(object_store, bucket_uri.join("maps/m.mrc"), volume, 3.5)
    stored = object_store.get_bytes(bucket_uri.join("maps/m.mrc"))
    assert info.size == len(stored) == HEADER_BYTES + volume.nbytes
    assert stored == encode_mrc(volume, 3.5)
    assert stored[HEADER_BYTES:] == volume.astype("<f4").tobytes()
    np.testing.assert_array_equal(read_mrc(object_store, bucket_uri.join("maps/m.mrc")).data, volume)


def corrupt(raw: bytes, offset: int, value: bytes) -> bytes:
    return raw[:offset] + value + raw[offset + len(value) :]


@pytest.mark.parametrize(
    ("offset", "value", "reason"),
    [
        (12, np.int32(99).tobytes(), "mode 99"),
        (0, np.int32(0).tobytes(), "dimensions"),
        (4, np.int32(-5).tobytes(), "dimensions"),
        (208, b"XYZW", "identifier"),
        (64, np.int32(3).tobytes(), "axis order"),
        (92, np.int32(-8).tobytes(), "extended header size"),
    ],
)
def test_corrupt_headers_are_refused_naming_the_object(offset, value, reason):
    raw = corrupt(encode_mrc(random_images(2, 8), 1.0, is_stack=True), offset, value)
    with pytest.raises(InvalidArgumentError, match=reason) as caught:
        decode_mrc(raw, "s3://b/x.mrcs")
    assert caught.value.field == "s3://b/x.mrcs"


def test_truncated_and_overlong_objects_are_refused():
    raw = encode_mrc(random_images(3, 16), 1.0, is_stack=True)
    header = parse_header(raw[:HEADER_BYTES], "s.mrcs")
    check_size(header, len(raw), "s.mrcs")
    with pytest.raises(InvalidArgumentError, match="truncated MRC"):
        decode_mrc(raw[:-1], "s.mrcs")
    with pytest.raises(InvalidArgumentError, match="more than the"):
        decode_mrc(raw + b"\0", "s.mrcs")
    with pytest.raises(InvalidArgumentError, match="fewer than an MRC header"):
        decode_mrc(raw[:100], "s.mrcs")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_pixels_are_refused_on_write_and_on_read(bad):
    images = random_images(4, 8)
    images[2, 3, 3] = bad
    with pytest.raises(InvalidArgumentError, match=r"image 3 \(1-based\) contains NaN or Inf"):
        encode_mrc(images, 1.0)
    raw = bytearray(encode_mrc(random_images(4, 8), 1.0))
    raw[HEADER_BYTES + 2 * 64 * 4 : HEADER_BYTES + 2 * 64 * 4 + 4] = np.float32(bad).tobytes()
    with pytest.raises(InvalidArgumentError, match=r"image 3 \(1-based\)"):
        decode_mrc(bytes(raw), "x.mrcs")


def test_invalid_voxel_sizes_are_refused():
    for voxel in (0.0, -1.0, np.nan):
        with pytest.raises(InvalidArgumentError, match="voxel_size_a"):
            encode_mrc(random_images(2, 4), voxel)


def test_running_statistics_match_numpy_over_uneven_chunks():
    values = (random_images(10, 9, seed=4) * 5 + 100).astype(np.float32)
    stats = RunningStats()
    for chunk in (values[:1], values[1:7], values[7:]):
        stats.update(chunk)
    assert stats.count == values.size
    assert stats.minimum == values.min() and stats.maximum == values.max()
    assert stats.mean == pytest.approx(values.mean(dtype=np.float64), rel=1e-12)
    assert stats.rms == pytest.approx(values.std(dtype=np.float64), rel=1e-9)
