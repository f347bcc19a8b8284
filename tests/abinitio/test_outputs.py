"""The files of an ab-initio job, read back with independent readers (mrcfile, starfile, pandas)."""

from __future__ import annotations

import io
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import starfile

from cryostack.core.geometry import euler_to_matrix
from cryostack.io.star import parse_star
from cryostack.services.abinitio import outputs
from cryostack.services.abinitio.state import AbinitioResult

STAR = """
data_optics

loop_
_rlnOpticsGroup #1
_rlnVoltage #2
_rlnSphericalAberration #3
_rlnAmplitudeContrast #4
_rlnImagePixelSize #5
_rlnImageSize #6
1 300.0 2.7 0.1 6.0 16

data_particles

loop_
_rlnImageName #1
_rlnDefocusU #2
_rlnDefocusV #3
_rlnDefocusAngle #4
_rlnOpticsGroup #5
"""


def _table(n: int):
    rows = "".join(f"{i + 1}@particles.mrcs 15000.0 14800.0 30.0 1\n" for i in range(n))
    return parse_star(STAR + rows, "test.star")


def _result(n: int = 7) -> AbinitioResult:
    """Three classes of sizes 1, 2 and 4 (working order), random volumes and poses."""
    rng = np.random.default_rng(0)
    volumes = rng.standard_normal((3, 16, 16, 16)).astype(np.float32)
    # Particle i belongs to class [2, 2, 2, 0, 0, 1, 2][i]: class 2 is the largest, then 0, then 1.
    best = np.array([2, 2, 2, 0, 0, 1, 2])[:n]
    posteriors = np.full((n, 3), 0.1, dtype=np.float32)
    posteriors[np.arange(n), best] = 0.8
    euler = np.stack([np.linspace(-170, 170, n), np.linspace(5, 175, n), np.linspace(-150, 150, n)], axis=1)  # (n, 3)
    return AbinitioResult(
        volumes=volumes,
        class_posteriors=posteriors,
        rotations=euler_to_matrix(euler[:, 0], euler[:, 1], euler[:, 2]),
        shift_px=rng.uniform(-2, 2, (n, 2)).astype(np.float32),
        half_map_fsc=np.linspace(1, 0, 3 * 9).reshape(3, 9),
        resolution_a=np.array([20.0, 25.0, 18.0]),
        final_resolution_a=12.0,
        pixel_size_a=6.0,
    )


def test_outputs_are_written_sorted_by_class_size_and_read_back_by_independent_readers(tmp_path: Path) -> None:
    result = _result()
    written: dict[str, bytes] = {}

    def write(relpath: str, data: bytes) -> str:
        written[relpath] = data
        return f"s3://bucket/jobs/j/{relpath}"

    uris, classes = outputs.write_outputs(write, _table(7), result, working_pixel_size_a=6.0)

    assert set(written) == {"class_001.mrc", "class_002.mrc", "class_003.mrc", "particles.star", "classes.csv",
                            "fsc.csv", "abinitio.png"}
    assert uris["particles.star"] == "s3://bucket/jobs/j/particles.star"
    np.testing.assert_array_equal(classes.counts, [4, 2, 1])
    # Largest class (working class 2) is class 1; its volume is class_001.mrc, with the voxel size set.
    (tmp_path / "class_001.mrc").write_bytes(written["class_001.mrc"])
    with mrcfile.open(tmp_path / "class_001.mrc", permissive=False) as mrc:
        np.testing.assert_array_equal(mrc.data, result.volumes[2])
        assert float(mrc.voxel_size.x) == 6.0 and mrc.data.shape == (16, 16, 16)

    (tmp_path / "particles.star").write_bytes(written["particles.star"])
    particles = starfile.read(tmp_path / "particles.star")["particles"]
    np.testing.assert_array_equal(particles["rlnClassNumber"], [1, 1, 1, 2, 2, 3, 1])
    np.testing.assert_allclose(particles["rlnMaxValueProbDistribution"], 0.8, rtol=1e-6)
    # Poses round-trip through Euler angles (RELION ZYZ) to the same rotation matrices.
    read_back = euler_to_matrix(particles["rlnAngleRot"], particles["rlnAngleTilt"], particles["rlnAnglePsi"])
    np.testing.assert_allclose(read_back, result.rotations, atol=1e-6)
    np.testing.assert_allclose(particles["rlnOriginXAngst"], -6.0 * result.shift_px[:, 0], rtol=1e-6)
    np.testing.assert_allclose(particles["rlnOriginYAngst"], -6.0 * result.shift_px[:, 1], rtol=1e-6)
    assert particles["rlnDefocusU"].tolist() == [15000.0] * 7  # input columns are kept

    table = pd.read_csv(io.BytesIO(written["classes.csv"]))
    assert table["particle_count"].tolist() == [4, 2, 1]
    assert table["volume"].tolist() == ["class_001.mrc", "class_002.mrc", "class_003.mrc"]
    np.testing.assert_allclose(table["half_map_resolution_a"], [18.0, 20.0, 25.0])
    np.testing.assert_allclose(table["occupancy_fraction"].sum(), 1.0, rtol=1e-5)
    fsc = pd.read_csv(io.BytesIO(written["fsc.csv"]))
    assert list(fsc.columns) == ["shell", "frequency_inv_a", "class_1", "class_2", "class_3"]
    np.testing.assert_allclose(fsc["frequency_inv_a"].iloc[-1], 1 / 12.0, rtol=1e-5)  # Nyquist of the 6 Å grid
    assert written["abinitio.png"][:4] == b"\x89PNG"

