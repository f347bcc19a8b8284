"""Particle stacks through the real store: STAR + MRCS round trips, random index sets, multipart stacks, real data."""

from __future__ import annotations

import threading
import warnings

import mrcfile
import numpy as np
import pandas as pd
import pytest
from io_helpers import random_images

from cryostack.errors import InvalidArgumentError
from cryostack.io.mrc import HEADER_BYTES, parse_header
from cryostack.io.objectstore import ObjectStore
from cryostack.io.particles import ParticleStackReader, StackWriter, write_stack
from cryostack.io.star import ParticleTable, read_star, write_star

MIB = 1024 * 1024


def make_table(n_stacks: int, per_stack: int, box_px: int, folder: str = "stacks/") -> ParticleTable:
    """A particle table over stacks `<folder>s<k>.mrcs` of `per_stack` images each."""
    optics = pd.DataFrame({
        "rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"], "rlnVoltage": [300.0],
        "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1], "rlnImagePixelSize": [1.5],
        "rlnImageSize": [box_px],
    })
    names = [f"{i + 1:06d}@{folder}s{s}.mrcs" for s in range(n_stacks) for i in range(per_stack)]
    n = len(names)
    particles = pd.DataFrame({
        "rlnImageName": names, "rlnDefocusU": np.linspace(10000, 20000, n), "rlnDefocusV": np.linspace(9000, 19000, n),
        "rlnDefocusAngle": np.linspace(0, 90, n), "rlnOpticsGroup": np.ones(n, dtype=int),
    })
    return ParticleTable(optics, particles, "test.star")


@pytest.mark.parametrize("box", [24, 25])
def test_star_and_stacks_round_trip_byte_exact_with_random_index_sets(object_store, bucket_uri, box):
    images = [random_images(30, box, seed=s) for s in range(3)]  # three stacks of (30, D, D)
    table = make_table(3, 30, box)
    for s, stack in enumerate(images):
        write_stack(object_store, bucket_uri.join(f"set/stacks/s{s}.mrcs"), stack, 1.5)
    write_star(object_store, bucket_uri.join("set/particles.star"), table)
    for s, stack in enumerate(images):
        stored = object_store.get_bytes(bucket_uri.join(f"set/stacks/s{s}.mrcs"))
        assert stored[HEADER_BYTES:] == stack.astype("<f4").tobytes()
        header = parse_header(stored[:HEADER_BYTES], "s")
        assert (header.nx, header.ny, header.nz, header.mode) == (box, box, 30, 2)
    everything = np.concatenate(images)  # (90, D, D) in table order
    reader = ParticleStackReader.from_star(object_store, bucket_uri.join("set/particles.star"), batch_size=16)
    assert len(reader) == 90 and reader.box_px == box
    rng = np.random.default_rng(box)
    for size in (1, 7, 90):
        chosen = rng.choice(90, size=size, replace=False)
        got = reader.read(chosen)
        assert got.dtype == np.float32 and got.shape == (size, box, box)
        assert got.tobytes() == everything[chosen].tobytes()
    repeated = np.array([5, 5, 60, 0])
    assert reader.read(repeated).tobytes() == everything[repeated].tobytes()
    assert reader.read(np.array([], dtype=np.int64)).shape == (0, box, box)


def test_iter_batches_prefetches_in_order_and_stops_when_closed(object_store, bucket_uri):
    images = random_images(50, 16, seed=2)
    write_stack(object_store, bucket_uri.join("stacks/s0.mrcs"), images, 1.5)
    reader = ParticleStackReader(object_store, make_table(1, 50, 16), bucket_uri, batch_size=8, prefetch_batches=2)
    order = np.random.default_rng(0).permutation(50)
    seen = []
    for batch_indices, batch in reader.iter_batches(order):
        assert len(batch_indices) <= 8
        np.testing.assert_array_equal(batch, images[batch_indices])
        seen.extend(batch_indices.tolist())
    assert seen == order.tolist()
    threads_before = threading.active_count()
    batches = reader.iter_batches(batch_size=4)
    next(batches)
    batches.close()
    assert threading.active_count() <= threads_before
    unprefetched = ParticleStackReader(object_store, make_table(1, 50, 16), bucket_uri, prefetch_batches=0)
    assert sum(len(b) for _, b in unprefetched.iter_batches(batch_size=20)) == 50


def test_a_stack_larger_than_one_part_streams_through_multipart(object_store_settings, bucket_uri, snapshot, tmp_path):
    store = ObjectStore(object_store_settings.model_copy(update={"part_size_bytes": 5 * MIB}))
    box = 63
    images = random_images(700, box, seed=11)  # 700 x 63² x 4 B ≈ 10.6 MiB: three parts
    uri = bucket_uri.join("big/stack.mrcs")
    with StackWriter(store, uri, box_px=box, pixel_size_a=2.0) as writer:
        for start in range(0, 700, 64):
            writer.write(images[start : start + 64])
            assert snapshot() == []  # nothing visible before the end
    info = store.stat(uri)
    assert info.size == HEADER_BYTES + images.nbytes and info.etag.endswith("-3")
    stored = store.get_bytes(uri)
    assert stored[HEADER_BYTES:] == images.tobytes()
    (tmp_path / "stack.mrcs").write_bytes(stored)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with mrcfile.open(str(tmp_path / "stack.mrcs"), permissive=False) as mrc:
            assert mrc.is_image_stack() and mrc.header.nz == 700
            assert float(mrc.header.dmax) == images.max() and float(mrc.header.dmin) == images.min()
            assert mrc.voxel_size.x == pytest.approx(2.0)
    write_star(store, bucket_uri.join("big/particles.star"), make_table(1, 700, box, folder="./"))
    store.put_bytes(bucket_uri.join("big/s0.mrcs"), stored)
    reader = ParticleStackReader.from_star(store, bucket_uri.join("big/particles.star"))
    chosen = np.sort(np.random.default_rng(1).choice(700, 200, replace=False))
    assert reader.read(chosen).tobytes() == images[chosen].tobytes()


@pytest.mark.parametrize("name", ["relion31", "relion30", "aspire17"])
def test_real_particle_sets_read_like_mrcfile(upload_real_set, object_store, name):
    star_uri, _, stack_path = upload_real_set(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # relion31.mrcs has a blank identifier and machine stamp
        with mrcfile.open(str(stack_path), permissive=True) as mrc:
            expected = np.array(mrc.data)  # (N, D, D)
    reader = ParticleStackReader.from_star(object_store, star_uri, batch_size=4)
    table = read_star(object_store, star_uri)
    order = table.image_refs.index
    everything = np.concatenate([batch for _, batch in reader.iter_batches()])
    np.testing.assert_array_equal(everything, expected[order])
    reverse = np.arange(len(reader))[::-1]
    np.testing.assert_array_equal(reader.read(reverse), expected[order][reverse])


def test_local_stack_writer_produces_a_strictly_valid_file(tmp_path):
    images = random_images(9, 21, seed=3)
    with StackWriter.to_file(tmp_path / "s.mrcs", box_px=21, pixel_size_a=1.1) as writer:
        writer.write(images[:4])
        writer.write(images[4:])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.mrcs"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with mrcfile.open(str(tmp_path / "s.mrcs"), permissive=False) as mrc:
            np.testing.assert_array_equal(mrc.data, images)
    bad_writer = StackWriter.to_file(tmp_path / "t.mrcs", box_px=21, pixel_size_a=1.1)
    with pytest.raises(InvalidArgumentError), bad_writer as w:
        w.write(images)
        w.write(np.full((21, 21), np.nan, dtype=np.float32))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.mrcs"]


@pytest.mark.parametrize("dtype", [np.int16, np.uint16, np.float16, np.dtype(">f4")])
def test_stacks_in_other_modes_and_byte_orders_read_as_float32(object_store, bucket_uri, tmp_path, dtype):
    values = (random_images(10, 17, seed=7) * 100).astype(dtype)
    path = tmp_path / "s0.mrcs"
    with mrcfile.new(str(path)) as mrc:
        mrc.set_data(values)
    object_store.put_bytes(bucket_uri.join("stacks/s0.mrcs"), path.read_bytes())
    reader = ParticleStackReader(object_store, make_table(1, 10, 17), bucket_uri)
    chosen = np.array([9, 0, 4])
    images = reader.read(chosen)
    assert images.dtype == np.float32
    np.testing.assert_array_equal(images, values[chosen].astype(np.float32))
