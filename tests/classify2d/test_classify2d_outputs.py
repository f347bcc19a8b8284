"""Output files of 2D classification: ordering by count, particles.star columns, the montage and the stack, the
files read back with independent readers (starfile, mrcfile) as RELION and cryoSPARC users would."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib.image
import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from cryostack.io.mrc import decode_mrc
from cryostack.io.star import ParticleTable, parse_star, star_bytes
from cryostack.services.classify2d.state import ClassificationResult, FinalAssignment
from cryostack.services.classify2d.outputs import (
    class_averages_bytes,
    class_table,
    montage_png,
    particles_table,
    sort_classes,
)


@pytest.fixture
def result() -> ClassificationResult:
    """Four particles in three classes (class 1 holds two, class 2 none), box 8."""
    rng = np.random.default_rng(0)
    averages = rng.normal(size=(3, 8, 8)).astype(np.float32)
    labels = np.array([1, 0, 1, 2])
    return ClassificationResult(
        averages=averages,
        assignment=FinalAssignment(
            labels=labels,
            psi_deg=np.array([10.0, 190.0, 350.0, -5.0]),
            shift_px=np.array([[1.0, -2.0], [0.0, 0.5], [0.0, 0.0], [3.0, 1.0]]),
            probability=np.array([0.9, 1.0, 0.5, 0.7]),
        ),
        counts=np.bincount(labels, minlength=3),
        frc=np.tile(np.linspace(1, 0, 5), (3, 1)),
        frc_resolution_a=np.array([20.0, 12.0, np.nan]),
        capacity=None,
        reseeded=0,
    )


@pytest.fixture
def table() -> ParticleTable:
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnVoltage": [300.0], "rlnSphericalAberration": [2.7],
                           "rlnAmplitudeContrast": [0.1], "rlnImagePixelSize": [2.0], "rlnImageSize": [8]})
    particles = pd.DataFrame({"rlnImageName": [f"{i}@stack.mrcs" for i in range(1, 5)], "rlnOpticsGroup": [1] * 4,
                              "rlnDefocusU": [1e4] * 4, "rlnDefocusV": [1e4] * 4, "rlnDefocusAngle": [0.0] * 4})
    return ParticleTable(optics, particles)


def test_classes_are_numbered_by_count_largest_first(result: ClassificationResult) -> None:
    classes = sort_classes(result)
    np.testing.assert_array_equal(classes.order, [1, 0, 2])
    np.testing.assert_array_equal(classes.number, [2, 1, 3])
    np.testing.assert_array_equal(classes.counts, [2, 1, 1])
    np.testing.assert_array_equal(classes.averages[0], result.averages[1])
    rows = class_table(classes)
    assert rows["class_number"].tolist() == [1, 2, 3]
    assert rows["frc_resolution_a"].tolist()[:2] == [12.0, 20.0] and np.isnan(rows["frc_resolution_a"][2])


def test_particles_star_carries_class_angle_origin_and_probability(
    result: ClassificationResult, table: ParticleTable, tmp_path: Path
) -> None:
    classes = sort_classes(result)
    payload = star_bytes(particles_table(table, result, classes, pixel_size_a=2.0))
    parsed = parse_star(payload, "particles.star")
    (tmp_path / "particles.star").write_bytes(payload)
    independent = starfile.read(tmp_path / "particles.star", always_dict=True)
    assert set(independent) == {"optics", "particles"}
    assert independent["optics"]["rlnImagePixelSize"].tolist() == [2.0]
    particles = independent["particles"]
    for columns in (parsed.particles, particles):
        assert columns["rlnClassNumber"].tolist() == [1, 2, 1, 3]
        np.testing.assert_allclose(columns["rlnAnglePsi"], [10.0, -170.0, -10.0, -5.0])
        # RELION's origin recentres the particle: minus the image shift, in Å.
        np.testing.assert_allclose(columns["rlnOriginXAngst"], [-2.0, 0.0, 0.0, -6.0])
        np.testing.assert_allclose(columns["rlnOriginYAngst"], [4.0, -1.0, 0.0, -2.0])
        np.testing.assert_allclose(columns["rlnMaxValueProbDistribution"], [0.9, 1.0, 0.5, 0.7])
        # The input's columns and rows are kept as they were.
        assert columns["rlnImageName"].tolist() == table.particles["rlnImageName"].tolist()
        np.testing.assert_allclose(columns["rlnDefocusU"], table.defocus_u_a)


def test_class_average_stack_is_in_class_number_order(result: ClassificationResult, tmp_path: Path) -> None:
    classes = sort_classes(result)
    payload = class_averages_bytes(classes, 2.0)
    decoded = decode_mrc(payload, "class_averages.mrcs")
    np.testing.assert_array_equal(decoded.data, classes.averages)
    assert decoded.header.voxel_size_a[0] == pytest.approx(2.0)
    path = tmp_path / "class_averages.mrcs"
    path.write_bytes(payload)
    report = io.StringIO()
    assert mrcfile.validate(str(path), print_file=report), report.getvalue()
    with mrcfile.open(path, permissive=False) as stack:
        assert stack.is_image_stack()
        np.testing.assert_array_equal(stack.data, classes.averages)
        assert float(stack.voxel_size.x) == pytest.approx(2.0)


def test_montage_is_a_png_with_a_tile_per_class(result: ClassificationResult) -> None:
    payload = montage_png(sort_classes(result), columns=2, tile_in=1.0)
    assert payload[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(io.BytesIO(payload), format="png")
    # Two columns of 1-inch tiles at 100 dpi, two rows of 1.25 inches.
    assert image.shape[:2] == (250, 200)
