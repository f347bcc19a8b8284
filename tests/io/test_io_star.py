"""STAR metadata: real RELION 3.1 and 3.0 files read like starfile does, typed accessors, writing, subsets."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import starfile

from cryostack.errors import InvalidArgumentError
from cryostack.io.star import (
    parse_index_list,
    parse_star,
    read_index_list,
    read_star,
    read_star_file,
    star_bytes,
    subset_indices,
    write_star,
    write_star_file,
)


@pytest.mark.parametrize("name", ["relion31", "aspire17"])
def test_relion31_sets_read_from_the_store_equal_starfile(upload_real_set, object_store, name):
    star_uri, star_path, _ = upload_real_set(name)
    table = read_star(object_store, star_uri)
    reference = starfile.read(star_path, always_dict=True)
    optics, particles = reference["optics"], reference["particles"]
    group_row = optics.set_index("rlnOpticsGroup").loc[particles["rlnOpticsGroup"]]
    assert len(table) == len(particles)
    np.testing.assert_array_equal(table.defocus_u_a, particles["rlnDefocusU"])
    np.testing.assert_array_equal(table.defocus_v_a, particles["rlnDefocusV"])
    np.testing.assert_array_equal(table.defocus_angle_deg, particles["rlnDefocusAngle"])
    np.testing.assert_array_equal(table.phase_shift_deg, particles["rlnPhaseShift"])
    np.testing.assert_array_equal(table.bfactor_a2, particles["rlnCtfBfactor"])
    np.testing.assert_array_equal(table.voltage_kv, group_row["rlnVoltage"])
    np.testing.assert_array_equal(table.cs_mm, group_row["rlnSphericalAberration"])
    np.testing.assert_array_equal(table.amplitude_contrast, group_row["rlnAmplitudeContrast"])
    np.testing.assert_array_equal(table.pixel_size_a, group_row["rlnImagePixelSize"])
    np.testing.assert_array_equal(table.euler_angles_deg, particles[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]])
    np.testing.assert_array_equal(table.origin_xy_a, particles[["rlnOriginXAngst", "rlnOriginYAngst"]])
    expected_index = [int(n.split("@")[0]) - 1 for n in particles["rlnImageName"]]
    np.testing.assert_array_equal(table.image_refs.index, expected_index)
    assert set(table.image_refs.path) == {n.split("@")[1] for n in particles["rlnImageName"]}
    expected_box = {"relion31": 256, "aspire17": 200}[name]  # aspire17 has no rlnImageSize: read from the stack
    assert table.box_size_px == expected_box and (table.box_px == expected_box).all()


def test_aspire_set_has_two_optics_groups_joined_per_particle(upload_real_set, object_store):
    table = read_star(object_store, upload_real_set("aspire17")[0])
    groups = table.particles["rlnOpticsGroup"].to_numpy()
    assert set(groups) == {1, 2}
    np.testing.assert_array_equal(table.voltage_kv, np.where(groups == 1, 300.0, 200.0))


def test_relion30_set_gets_a_derived_optics_table(upload_real_set, object_store, tmp_path):
    star_uri, star_path, _ = upload_real_set("relion30")
    table = read_star(object_store, star_uri)
    reference = starfile.read(star_path)
    assert len(table.optics) == 1
    np.testing.assert_allclose(table.pixel_size_a, 5.0 * 1e4 / 38168.0, rtol=1e-15)
    np.testing.assert_array_equal(table.voltage_kv, reference["rlnVoltage"])
    np.testing.assert_array_equal(table.cs_mm, reference["rlnSphericalAberration"])
    np.testing.assert_array_equal(table.amplitude_contrast, reference["rlnAmplitudeContrast"])
    np.testing.assert_array_equal(table.defocus_u_a, reference["rlnDefocusU"])
    np.testing.assert_array_equal(table.phase_shift_deg, np.zeros(7))
    assert table.box_size_px == 320
    assert "rlnVoltage" not in table.particles.columns and (table.particles["rlnOpticsGroup"] == 1).all()
    assert table.particles["rlnMicrographName"].tolist() == [str(i) for i in range(1, 8)]  # kept as text
    (tmp_path / "written.star").write_bytes(star_bytes(table))
    assert set(starfile.read(tmp_path / "written.star", always_dict=True)) == {"optics", "particles"}
    written = parse_star(star_bytes(table), "written.star")
    np.testing.assert_allclose(written.pixel_size_a, table.pixel_size_a, rtol=1e-11)  # 12 significant digits


def test_six_optics_groups_join_with_per_group_values(shared_data_dir):
    table = read_star_file(shared_data_dir / "metadata" / "relion31.6opticsgroups.star")
    reference = starfile.read(shared_data_dir / "metadata" / "relion31.6opticsgroups.star")
    by_group = reference["optics"].set_index("rlnOpticsGroup")
    groups = reference["particles"]["rlnOpticsGroup"]
    np.testing.assert_array_equal(table.pixel_size_a, by_group.loc[groups, "rlnImagePixelSize"])
    np.testing.assert_array_equal(table.cs_mm, by_group.loc[groups, "rlnSphericalAberration"])
    assert table.box_size_px == 196 and len(table) == 139


def test_written_star_keeps_input_columns_and_adds_results(upload_real_set, object_store, bucket_uri):
    table = read_star(object_store, upload_real_set("relion31")[0])
    classes = np.array([3, 1, 2, 3, 1])
    psi = np.linspace(-180.0, 179.5, 5).astype(np.float32)
    result = table.with_columns({"rlnClassNumber": classes, "rlnAnglePsi": psi, "rlnMaxValueProbDistribution": 0.5})
    out = bucket_uri.join("jobs/1/particles.star")
    write_star(object_store, out, result)
    back = read_star(object_store, out)
    assert list(back.particles.columns) == list(table.particles.columns)  # every input column, in input order
    np.testing.assert_array_equal(back.particles["rlnClassNumber"], classes)
    np.testing.assert_array_equal(back.particles["rlnAnglePsi"].to_numpy(np.float32), psi)  # float32 exact
    np.testing.assert_array_equal(back.particles["rlnMaxValueProbDistribution"], 0.5)
    for column in table.particles.columns:
        if column not in ("rlnClassNumber", "rlnAnglePsi", "rlnMaxValueProbDistribution"):
            pd.testing.assert_series_equal(back.particles[column], table.particles[column])
    pd.testing.assert_frame_equal(back.optics, table.optics)
    with pytest.raises(InvalidArgumentError, match="expected \\(5,\\)"):
        table.with_columns({"rlnClassNumber": [1, 2]})


def test_local_star_files_round_trip(tmp_path, shared_data_dir):
    table = read_star_file(shared_data_dir / "real-particles" / "relion31.star")
    write_star_file(tmp_path / "out.star", table.take([4, 0]))
    back = read_star_file(tmp_path / "out.star", fill_box_size=False)
    np.testing.assert_array_equal(back.defocus_u_a, table.defocus_u_a[[4, 0]])
    assert [p.name for p in tmp_path.iterdir()] == ["out.star"]


def test_subsets_by_count_and_seed_or_by_explicit_indices(object_store, bucket_uri):
    first = subset_indices(1000, count=100, seed=7)
    assert np.array_equal(first, subset_indices(1000, count=100, seed=7))
    assert len(np.unique(first)) == 100 and first.min() >= 0 and first.max() < 1000
    assert not np.array_equal(first, subset_indices(1000, count=100, seed=8))
    assert subset_indices(10, count=10, seed=0).tolist() == list(range(10))
    assert subset_indices(10, indices=np.array([7, 2, 5])).tolist() == [2, 5, 7]
    object_store.put_bytes(bucket_uri.join("subset.txt"), b"# chosen by hand\n3\n\n1  # the first\n8\n")
    assert read_index_list(object_store, bucket_uri.join("subset.txt")).tolist() == [3, 1, 8]
    with pytest.raises(InvalidArgumentError, match="line 2"):
        parse_index_list("1\nx\n", "list.txt")
