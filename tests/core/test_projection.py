"""Fourier-slice projector: adjointness, analytic projections, RELION's own projections, 2D rotation, GPU parity.

The RELION check uses ``relion_project`` output shipped in the shared data (ASPIRE-Python's saved test data):
``clean70SRibosome_vol.npy`` projected at the Euler angles of ``rln_proj_65*.star``. Measured with this projector:
the correct convention gives a normalised cross-correlation above 0.9999 per image (relative error ~0.3%, against
~3% without the gridding correction); transposed volumes, negated or swapped angles, or the opposite origin sign
give 0.0–0.8 on average. RELION's odd-box projections come out one pixel further along +x and +y than the
``D // 2`` origin (ASPIRE's test of the same files applies the same one-pixel correction); even boxes have no
such offset, as the ``rln_proj_64_shifted`` set (the volume Fourier-cropped to 64³) shows.
"""

from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile

from cryostack.core.backend import cupy_available
from cryostack.core.fourier import (
    fft2_centered,
    fft3_centered,
    fourier_crop_3d,
    ifft2_centered,
    ifft3_centered,
    phase_shift_2d,
)
from cryostack.core.geometry import (
    euler_to_matrix,
    relion_origin_to_shift_px,
    rotation_matrix_2d,
    uniform_random_rotations,
)
from cryostack.core.projection import (
    FourierAccumulator,
    FourierAccumulator2D,
    Projector,
    Projector2D,
    _make_plan,
    _merge_equal_poses,
    backproject,
    backrotate_2d,
)
from cryostack.errors import InvalidArgumentError

# |<P v, x> - <v, Pᵀ x>| relative to ||P v||·||x||: float32 rounding over ~10⁴-term sums.
ADJOINT_TOL = 1e-6


def _complex_noise(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)


def _real_inner(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.real(np.vdot(a.astype(np.complex128), b.astype(np.complex128))))


@pytest.mark.parametrize("box", [16, 17])
@pytest.mark.parametrize("subset", ["full", "mask", "indices"])
def test_backprojection_is_the_adjoint(box: int, subset: str) -> None:
    rng = np.random.default_rng(box)
    volume = rng.standard_normal((box, box, box)).astype(np.float32)
    rotations = uniform_random_rotations(9, rng)
    coefficients = None
    if subset == "mask":
        coefficients = rng.random((box, box)) < 0.4
    elif subset == "indices":
        coefficients = rng.choice(box * box, size=box * box // 3, replace=False)
    slices = Projector(volume).project(rotations, coefficients=coefficients)
    data = _complex_noise(rng, slices.shape)
    back = backproject(data, rotations, coefficients=coefficients, box_px=box)
    assert back.shape == (box, box, box) and back.dtype == np.float32
    lhs = _real_inner(slices, data)
    rhs = float(np.dot(volume.astype(np.float64).ravel(), back.astype(np.float64).ravel()))
    assert abs(lhs - rhs) <= ADJOINT_TOL * np.linalg.norm(slices) * np.linalg.norm(data)


@pytest.mark.parametrize("box", [16, 17])
def test_2d_backrotation_is_the_adjoint(box: int) -> None:
    rng = np.random.default_rng(10 + box)
    images = rng.standard_normal((3, box, box)).astype(np.float32)
    rotations = rotation_matrix_2d(rng.uniform(0, 360, 5))
    mask = rng.random((box, box)) < 0.5
    for coefficients in (None, mask):
        rotated = Projector2D(images).rotate(rotations, coefficients=coefficients)
        assert rotated.shape[:2] == (3, 5)
        data = _complex_noise(rng, rotated.shape)
        back = backrotate_2d(data, rotations, coefficients=coefficients, box_px=box)
        rhs = float(np.dot(images.astype(np.float64).ravel(), back.astype(np.float64).ravel()))
        lhs = _real_inner(rotated, data)
        assert abs(lhs - rhs) <= ADJOINT_TOL * np.linalg.norm(rotated) * np.linalg.norm(data)


@pytest.mark.parametrize("box", [32, 33])
def test_projection_of_an_off_centre_gaussian_matches_the_line_integral(box: int) -> None:
    c = np.arange(box) - box // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    centre = np.array([3.0, -4.0, 2.0])  # (x, y, z) pixels from the origin
    sigma = 2.5
    volume = np.exp(-((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2) / (2 * sigma**2))
    rotation = euler_to_matrix(30.0, 50.0, 70.0)
    image = ifft2_centered(Projector(volume.astype(np.float32)).project(rotation[None]))[0]
    assert np.abs(image.imag).max() < 1e-4
    # The volume rotated by A has its blob at A·centre; the line integral along z is a 2D Gaussian of mass √(2π)σ.
    moved = rotation @ centre
    yy, xx = np.meshgrid(c, c, indexing="ij")
    expected = np.sqrt(2 * np.pi) * sigma * np.exp(-((xx - moved[0]) ** 2 + (yy - moved[1]) ** 2) / (2 * sigma**2))
    assert np.abs(image.real - expected).max() < 0.015 * expected.max()


def test_subset_projection_equals_full_grid_entries_and_chunking_is_invisible() -> None:
    rng = np.random.default_rng(3)
    projector = Projector(rng.standard_normal((20, 20, 20)).astype(np.float32))
    rotations = uniform_random_rotations(7, rng)
    full = projector.project(rotations)
    index = rng.choice(400, size=90, replace=False)
    # A subset interpolates k itself where the full grid may conjugate its mate -k: equal to float32 rounding.
    scale = np.abs(full).max()
    np.testing.assert_allclose(
        projector.project(rotations, coefficients=index), full.reshape(7, -1)[:, index], rtol=0, atol=1e-5 * scale
    )
    np.testing.assert_array_equal(projector.project(rotations, chunk_elements=50), full)
    # Corners beyond |k| = D/2 carry nothing.
    assert np.all(full[:, 0, 0] == 0) and np.all(full[:, 0, 10] != 0)


def test_accumulator_insert_is_linear_and_additive() -> None:
    rng = np.random.default_rng(4)
    box = 12
    rotations = uniform_random_rotations(6, rng)
    slices = _complex_noise(rng, (6, box, box))
    weights = rng.random((6, box, box)).astype(np.float32)
    whole = FourierAccumulator(box)
    whole.insert(slices, rotations, weights)
    first, second = FourierAccumulator(box), FourierAccumulator(box)
    first.insert(slices[:2], rotations[:2], weights[:2])
    second.insert(slices[2:], rotations[2:], weights[2:])
    first.add(second)
    data_whole, weight_whole = whole.padded_sums()
    data_split, weight_split = first.padded_sums()
    np.testing.assert_allclose(data_split, data_whole, atol=1e-5)
    np.testing.assert_allclose(weight_split, weight_whole, atol=1e-5)
    # Every slice passes through the origin with trilinear weight 1.
    centre = whole.padded_box_px // 2
    assert weight_whole[centre, centre, centre] == pytest.approx(weights[:, box // 2, box // 2].sum(), rel=1e-6)


def _insert_2d_with_repeated_poses(xp: object, rng: np.random.Generator, subset: bool) -> tuple[object, object]:
    """12 rows at 3 classes × 2 angles, each pair repeated twice: sums inserted at once, and per row on its own."""
    box = 14
    count = 12
    classes = np.array([0, 2, 1, 0, 2, 1, 0, 2, 1, 0, 1, 2])
    angles = np.array([30.0, 30.0, 30.0, 30.0, 75.5, 75.5, 30.0, 75.5, 75.5, 75.5, 30.0, 30.0])
    coefficients = np.flatnonzero(rng.random(box * box) < 0.6) if subset else None
    width = (box, box) if coefficients is None else (coefficients.size,)
    slices = _complex_noise(rng, (count,) + width)
    weights = rng.random((count,) + width).astype(np.float32)
    rotations = rotation_matrix_2d(angles)
    merged, single = FourierAccumulator2D(3, box, xp=xp), FourierAccumulator2D(3, box, xp=xp)
    merged.insert(xp.asarray(slices), xp.asarray(rotations), xp.asarray(classes), xp.asarray(weights),
                  coefficients=coefficients)
    for row in range(count):
        single.insert(xp.asarray(slices[row : row + 1]), xp.asarray(rotations[row : row + 1]),
                      xp.asarray(classes[row : row + 1]), xp.asarray(weights[row : row + 1]),
                      coefficients=coefficients)
    return merged.padded_sums(), single.padded_sums()


@pytest.mark.parametrize("subset", [False, True])
def test_2d_insertions_sharing_a_pose_are_summed_before_interpolation(subset: bool) -> None:
    (data_merged, weight_merged), (data_single, weight_single) = _insert_2d_with_repeated_poses(
        np, np.random.default_rng(9), subset
    )
    np.testing.assert_allclose(data_merged, data_single, atol=1e-5 * np.abs(data_single).max())
    np.testing.assert_allclose(weight_merged, weight_single, atol=1e-5 * weight_single.max())
    # Every class received rows (the comparison is not between empty accumulators).
    assert np.all(weight_single.reshape(3, -1).max(axis=1) > 0.5)


def test_2d_rows_sharing_a_class_and_matrix_merge_into_one() -> None:
    classes = np.array([0, 2, 1, 0, 2, 1, 0, 2, 1, 0, 1, 2])
    rotations = rotation_matrix_2d(np.array([30.0, 30, 30, 30, 75.5, 75.5, 30, 75.5, 75.5, 75.5, 30, 30]))
    values = np.arange(12, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)  # row r holds r
    (merged,), pair_rotations, pair_classes = _merge_equal_poses([values], rotations, classes)
    pairs = {(int(c), round(float(np.degrees(np.arctan2(r[0, 1], r[0, 0]))), 1)): float(v[0])
             for c, r, v in zip(pair_classes, pair_rotations, merged, strict=True)}
    assert pairs == {(0, 30.0): 0 + 3 + 6, (2, 30.0): 1 + 11, (1, 30.0): 2 + 10, (2, 75.5): 4 + 7,
                     (1, 75.5): 5 + 8, (0, 75.5): 9}


@pytest.mark.parametrize(("box", "subset"), [(17, False), (16, True)])
def test_2d_rotation_on_a_quarter_turn_grid_equals_each_angle_on_its_own(box: int, subset: bool) -> None:
    rng = np.random.default_rng(10)
    images = rng.standard_normal((3, box, box)).astype(np.float32)
    ky, kx = np.divmod(np.arange(box * box), box) - np.array(box // 2)
    coefficients = np.flatnonzero(4 * (kx**2 + ky**2) <= (box - 4) ** 2) if subset else None
    angles = np.arange(12) * 30.0 + 7.0  # four quarter-turned copies of 7°, 37°, 67°
    projector = Projector2D(images)
    assert _make_plan(box, coefficients, np).quarter_turn is not None
    together = projector.rotate(rotation_matrix_2d(angles), coefficients=coefficients)
    alone = np.concatenate(
        [projector.rotate(rotation_matrix_2d(angles[j : j + 1]), coefficients=coefficients) for j in range(12)], 1
    )
    np.testing.assert_allclose(together, alone, atol=1e-5 * np.abs(alone).max())
    # Rotating a rotated image back by a quarter turn: the coefficients move, not just the order of the rows.
    assert np.abs(together[:, 3] - together[:, 0]).max() > 0.1 * np.abs(alone).max()


def test_an_even_full_grid_is_not_closed_under_quarter_turns() -> None:
    # (kx, ky) = (0, -8) turns into (8, 0), outside the 16-grid: the full even grid is interpolated angle by angle.
    assert _make_plan(16, None, np).quarter_turn is None
    assert _make_plan(17, None, np).quarter_turn is not None


def test_in_plane_rotation_reproduces_the_psi_of_relion_angles() -> None:
    box = 24
    volume = np.zeros((box, box, box), np.float32)
    volume[8:14, 10:13, 9:17] = 1.0  # an asymmetric brick
    projector = Projector(volume)
    psi = 37.0
    at_zero = ifft2_centered(projector.project(euler_to_matrix(20.0, 60.0, 0.0)[None])).real[0]
    at_psi = projector.project(euler_to_matrix(20.0, 60.0, psi)[None])[0]
    rotated = Projector2D(at_zero).rotate(rotation_matrix_2d(np.array([psi])))[0, 0]
    a, b = ifft2_centered(rotated).real.ravel(), ifft2_centered(at_psi).real.ravel()
    assert np.corrcoef(a, b)[0, 1] > 0.99
    wrong = Projector2D(at_zero).rotate(rotation_matrix_2d(np.array([-psi])))[0, 0]
    assert np.corrcoef(ifft2_centered(wrong).real.ravel(), b)[0, 1] < 0.9


def _ncc(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(axis=(-1, -2), keepdims=True)
    b = b - b.mean(axis=(-1, -2), keepdims=True)
    return (a * b).sum((-1, -2)) / np.sqrt((a * a).sum((-1, -2)) * (b * b).sum((-1, -2)))


def _relion_set(folder: Path, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RELION images (N, D, D), matrices (N, 3, 3) and origins (N, 2) in pixels of one conventions/ set."""
    table = starfile.read(folder / f"{name}.star")
    particles = table["particles"] if isinstance(table, dict) else table
    optics = table.get("optics") if isinstance(table, dict) else None
    pixel_a = float(optics["rlnImagePixelSize"].iloc[0]) if optics is not None else 1.0
    if "rlnOriginXAngst" in particles:
        origins_px = -relion_origin_to_shift_px(particles[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(), pixel_a)
    else:  # pre-3.1 columns, already in pixels
        origins_px = particles[["rlnOriginX", "rlnOriginY"]].to_numpy()
    angles = particles[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()
    images = mrcfile.read(folder / f"{name}.mrcs").astype(np.float32)
    return images, euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2]), origins_px


def _relion_like(projector: Projector, matrices: np.ndarray, origins_px: np.ndarray, sign: float) -> np.ndarray:
    """Our projections shifted as RELION's images (sign=1: by -origin, the documented convention)."""
    shifts = -sign * origins_px
    if projector.box_px % 2:
        shifts = shifts + 1.0  # RELION's odd-box output sits one pixel further along +x and +y
    return ifft2_centered(phase_shift_2d(projector.project(matrices), shifts)).real


@pytest.fixture(scope="module")
def ribosome(shared_data_dir: Path) -> np.ndarray:
    return np.load(shared_data_dir / "conventions" / "clean70SRibosome_vol.npy").astype(np.float32)


@pytest.mark.parametrize("name", ["rln_proj_65", "rln_proj_65_shifted"])
def test_projections_reproduce_relion_project(shared_data_dir: Path, ribosome: np.ndarray, name: str) -> None:
    images, matrices, origins = _relion_set(shared_data_dir / "conventions", name)
    projector = Projector(ribosome)
    ours = _relion_like(projector, matrices, origins, sign=1.0)
    assert _ncc(ours, images).min() > 0.9999
    relative = np.linalg.norm(
        (ours / ours.std((1, 2), keepdims=True) - images / images.std((1, 2), keepdims=True)).reshape(len(ours), -1),
        axis=1,
    ) / np.sqrt(ours[0].size)
    assert relative.max() < 0.01
    # The test can fail: wrong conventions are far from RELION's images.
    transposed = _relion_like(Projector(ribosome.transpose(2, 1, 0).copy()), matrices, origins, 1.0)
    negated = _relion_like(projector, np.transpose(matrices, (0, 2, 1)), origins, 1.0)
    assert _ncc(transposed, images).mean() < 0.9
    assert _ncc(negated, images).mean() < 0.9
    if np.abs(origins).max() > 0:
        assert _ncc(_relion_like(projector, matrices, origins, sign=-1.0), images).mean() < 0.5


def test_even_box_projections_reproduce_relion_project(shared_data_dir: Path, ribosome: np.ndarray) -> None:
    images, matrices, origins = _relion_set(shared_data_dir / "conventions", "rln_proj_64_shifted")
    cropped = ifft3_centered(fourier_crop_3d(fft3_centered(ribosome), 64)).real.astype(np.float32)
    ours = _relion_like(Projector(cropped), matrices, origins, sign=1.0)
    assert _ncc(ours, images).min() > 0.9999


@pytest.mark.parametrize(
    ("volume", "field"),
    [(np.zeros((4, 4, 5), np.float32), "volume"), (np.full((4, 4, 4), np.nan, np.float32), "volume")],
)
def test_bad_volumes_raise(volume: np.ndarray, field: str) -> None:
    with pytest.raises(InvalidArgumentError) as error:
        Projector(volume)
    assert error.value.field == field


def test_bad_rotations_raise() -> None:
    projector = Projector(np.zeros((8, 8, 8), np.float32))
    with pytest.raises(InvalidArgumentError):
        projector.project(np.eye(3))
    with pytest.raises(InvalidArgumentError):
        Projector(np.zeros((9, 9, 9), np.float32), pad_factor=1)


@pytest.mark.gpu
def test_cupy_matches_numpy() -> None:
    if not cupy_available():
        pytest.skip("CuPy with a CUDA device is not available")
    import cupy  # noqa: PLC0415

    rng = np.random.default_rng(6)
    box = 33
    volume = rng.standard_normal((box, box, box)).astype(np.float32)
    rotations = uniform_random_rotations(20, rng)
    host = Projector(volume).project(rotations)
    device = Projector(cupy.asarray(volume)).project(cupy.asarray(rotations))
    scale = np.abs(host).max()
    np.testing.assert_allclose(cupy.asnumpy(device), host, atol=1e-5 * scale)
    data = _complex_noise(rng, host.shape)
    back_host = backproject(data, rotations)
    back_device = backproject(cupy.asarray(data), cupy.asarray(rotations))
    np.testing.assert_allclose(cupy.asnumpy(back_device), back_host, atol=1e-4 * np.abs(back_host).max())
    images = rng.standard_normal((2, box, box)).astype(np.float32)
    angles = rotation_matrix_2d(rng.uniform(0, 360, 4))
    np.testing.assert_allclose(
        cupy.asnumpy(Projector2D(cupy.asarray(images)).rotate(cupy.asarray(angles))),
        Projector2D(images).rotate(angles),
        atol=1e-5 * np.abs(fft2_centered(images)).max(),
    )
    (data_merged, weight_merged), (data_single, weight_single) = _insert_2d_with_repeated_poses(cupy, rng, True)
    data_single, weight_single = cupy.asnumpy(data_single), cupy.asnumpy(weight_single)
    np.testing.assert_allclose(cupy.asnumpy(data_merged), data_single, atol=1e-5 * np.abs(data_single).max())
    np.testing.assert_allclose(cupy.asnumpy(weight_merged), weight_single, atol=1e-5 * weight_single.max())
