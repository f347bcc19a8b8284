"""The files of a refinement job from hand-made results, read back with independent readers (mrcfile, starfile,
pandas): class numbers in the request's volume order, the STAR's columns, the CSV tables and the report PNGs."""

from __future__ import annotations

import io
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
from PIL import Image

from cryostack.core.geometry import euler_to_matrix
from cryostack.io.star import parse_star
from cryostack.services.refine import outputs
from cryostack.services.refine.results import HeteroResult, HomoResult

BOX_PX = 16
PIXEL_SIZE_A = 6.0
SHELLS = BOX_PX // 2 + 1
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
# Particle i's most probable class, 0-based: class 2 is the largest, then 0, then 1 — sizes that a renumbering by
# size would reorder, which refinement must not do.
BEST_CLASS = np.array([2, 2, 2, 0, 0, 1, 2])
HALF_SET = np.array([0, 1, 0, 1, 0, 1, 1])


def _table(n: int):
    rows = "".join(f"{i + 1}@s3://data/set/particles.mrcs 15000.0 14800.0 30.0 1\n" for i in range(n))
    return parse_star(STAR + rows, "test.star")


def _poses(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    euler = np.stack([np.linspace(-170, 170, n), np.linspace(5, 175, n), np.linspace(-150, 150, n)], axis=1)  # (n, 3)
    return {
        "rotations": euler_to_matrix(euler[:, 0], euler[:, 1], euler[:, 2]),
        "shift_px": rng.uniform(-2, 2, (n, 2)).astype(np.float32),
        "half_set": HALF_SET[:n].copy(),
    }


def _hetero_result() -> HeteroResult:
    """Three classes of sizes 2, 1 and 4 (request order); class 2 has no gold-standard resolution."""
    rng = np.random.default_rng(0)
    n = BEST_CLASS.size
    posteriors = np.full((n, 3), 0.1, dtype=np.float32)
    posteriors[np.arange(n), BEST_CLASS] = 0.8
    return HeteroResult(
        **_poses(n, rng),
        pixel_size_a=PIXEL_SIZE_A,
        volumes=rng.standard_normal((3, BOX_PX, BOX_PX, BOX_PX)).astype(np.float32),
        half_maps=rng.standard_normal((3, 2, BOX_PX, BOX_PX, BOX_PX)).astype(np.float32),
        class_posteriors=posteriors,
        fsc=np.stack([np.linspace(1, 0, SHELLS), np.linspace(1, -0.1, SHELLS), np.linspace(1, 0.2, SHELLS)]),
        resolution_a=np.array([20.0, np.nan, 14.0]),
        iteration_count=4,
        final_class_change_fraction=0.02,
    )


def _homo_result() -> HomoResult:
    rng = np.random.default_rng(1)
    n = HALF_SET.size
    return HomoResult(
        **_poses(n, rng),
        pixel_size_a=PIXEL_SIZE_A,
        map=rng.standard_normal((BOX_PX,) * 3).astype(np.float32),
        half_maps=rng.standard_normal((2, BOX_PX, BOX_PX, BOX_PX)).astype(np.float32),
        mask=rng.uniform(0, 1, (BOX_PX,) * 3).astype(np.float32),
        fsc_unmasked=np.linspace(1, 0, SHELLS),
        fsc_masked=np.linspace(1, 0.1, SHELLS),
        fsc_corrected=np.linspace(1, 0.05, SHELLS),
        resolution_a=15.0,
        unmasked_resolution_a=18.0,
        iteration_count=5,
        resolution_history_a=np.array([30.0, 22.0, 17.0, 15.0, 15.0]),
    )


class _Recorder:
    """A ``write(relpath, data) -> uri`` that keeps what it was given, and local copies for file readers."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.written: dict[str, bytes] = {}

    def __call__(self, relpath: str, data: bytes) -> str:
        self.written[relpath] = data
        (self.folder / relpath).write_bytes(data)
        return f"s3://bucket/jobs/j/{relpath}"


def _check_mrc(path: Path, expected: np.ndarray) -> None:
    with mrcfile.open(path, permissive=False) as mrc:
        np.testing.assert_array_equal(mrc.data, expected)
        assert float(mrc.voxel_size.x) == pytest.approx(PIXEL_SIZE_A)
        assert mrc.data.shape == (BOX_PX,) * 3


def _check_poses(particles: pd.DataFrame, result: HeteroResult | HomoResult) -> None:
    """Poses round-trip through RELION ZYZ angles; origins are minus the shifts in Å; half-sets count from 1."""
    read_back = euler_to_matrix(particles["rlnAngleRot"], particles["rlnAngleTilt"], particles["rlnAnglePsi"])
    np.testing.assert_allclose(read_back, result.rotations, atol=1e-6)
    np.testing.assert_allclose(particles["rlnOriginXAngst"], -PIXEL_SIZE_A * result.shift_px[:, 0], rtol=1e-6)
    np.testing.assert_allclose(particles["rlnOriginYAngst"], -PIXEL_SIZE_A * result.shift_px[:, 1], rtol=1e-6)
    np.testing.assert_array_equal(particles["rlnRandomSubset"], HALF_SET + 1)
    assert particles["rlnDefocusU"].tolist() == [15000.0] * len(HALF_SET)  # input columns are kept
    assert particles["rlnImageName"].iloc[0] == "1@s3://data/set/particles.mrcs"


def test_hetero_outputs_keep_the_request_class_order_and_read_back(tmp_path: Path) -> None:
    result = _hetero_result()
    write = _Recorder(tmp_path)

    uris = outputs.write_hetero_outputs(write, _table(BEST_CLASS.size), result)

    volumes = {f"class_{n:03d}{suffix}.mrc" for n in (1, 2, 3) for suffix in ("", "_half_a", "_half_b")}
    assert set(write.written) == volumes | {"particles.star", "classes.csv", "fsc.csv", "hetero.png"}
    assert uris["particles.star"] == "s3://bucket/jobs/j/particles.star"
    for k in range(3):
        _check_mrc(tmp_path / f"class_{k + 1:03d}.mrc", result.volumes[k])
        _check_mrc(tmp_path / f"class_{k + 1:03d}_half_a.mrc", result.half_maps[k, 0])
        _check_mrc(tmp_path / f"class_{k + 1:03d}_half_b.mrc", result.half_maps[k, 1])

    particles = starfile.read(tmp_path / "particles.star")["particles"]
    np.testing.assert_array_equal(particles["rlnClassNumber"], BEST_CLASS + 1)
    np.testing.assert_allclose(particles["rlnMaxValueProbDistribution"], 0.8, rtol=1e-6)
    _check_poses(particles, result)

    classes = pd.read_csv(io.BytesIO(write.written["classes.csv"]))
    assert classes["class_number"].tolist() == [1, 2, 3]
    assert classes["particle_count"].tolist() == [2, 1, 4]
    assert classes["volume"].tolist() == ["class_001.mrc", "class_002.mrc", "class_003.mrc"]
    assert classes["half_map_b"].tolist() == ["class_001_half_b.mrc", "class_002_half_b.mrc", "class_003_half_b.mrc"]
    np.testing.assert_allclose(classes["gsfsc_resolution_a"], [20.0, np.nan, 14.0])
    np.testing.assert_allclose(classes["occupancy_fraction"].sum(), 1.0, rtol=1e-5)

    fsc = pd.read_csv(io.BytesIO(write.written["fsc.csv"]))
    assert list(fsc.columns) == ["shell", "frequency_inv_a", "resolution_a", "class_1", "class_2", "class_3"]
    assert len(fsc) == SHELLS
    np.testing.assert_allclose(fsc["frequency_inv_a"].iloc[-1], 1 / 12.0, rtol=1e-5)  # Nyquist of 6 Å pixels
    np.testing.assert_allclose(fsc["resolution_a"].iloc[1:], 1 / fsc["frequency_inv_a"].iloc[1:], rtol=1e-5)
    assert fsc["resolution_a"].iloc[0] == np.inf
    np.testing.assert_allclose(fsc["class_2"], result.fsc[1], atol=1e-6)

    png = Image.open(io.BytesIO(write.written["hetero.png"]))
    assert png.format == "PNG" and png.size[0] > png.size[1] / 2


def test_homo_outputs_hold_maps_mask_poses_and_three_fsc_curves(tmp_path: Path) -> None:
    result = _homo_result()
    write = _Recorder(tmp_path)

    uris = outputs.write_homo_outputs(write, _table(HALF_SET.size), result)

    assert set(write.written) == {"map.mrc", "half_map_a.mrc", "half_map_b.mrc", "mask.mrc", "particles.star",
                                  "fsc.csv", "homo.png"}
    assert uris["map.mrc"] == "s3://bucket/jobs/j/map.mrc"
    _check_mrc(tmp_path / "map.mrc", result.map)
    _check_mrc(tmp_path / "half_map_a.mrc", result.half_maps[0])
    _check_mrc(tmp_path / "half_map_b.mrc", result.half_maps[1])
    _check_mrc(tmp_path / "mask.mrc", result.mask)

    particles = starfile.read(tmp_path / "particles.star")["particles"]
    assert "rlnClassNumber" not in particles.columns
    _check_poses(particles, result)

    fsc = pd.read_csv(io.BytesIO(write.written["fsc.csv"]))
    assert list(fsc.columns) == ["shell", "frequency_inv_a", "resolution_a", "unmasked", "masked", "corrected"]
    np.testing.assert_allclose(fsc["unmasked"], result.fsc_unmasked, atol=1e-6)
    np.testing.assert_allclose(fsc["masked"], result.fsc_masked, atol=1e-6)
    np.testing.assert_allclose(fsc["corrected"], result.fsc_corrected, atol=1e-6)
    assert Image.open(io.BytesIO(write.written["homo.png"])).format == "PNG"
