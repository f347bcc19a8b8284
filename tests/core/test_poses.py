"""Pose grids: resolution-sized in-plane and shift sampling, the HEALPix pixelisation, and the SO(3) grid's
coverage, near-uniformity, neighbours and coarse-to-fine refinement."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from cryostack.core.geometry import euler_to_matrix, uniform_random_rotations
from cryostack.core.poses import (
    healpix_pixel_angles,
    inplane_angle_step_deg,
    inplane_angles_deg,
    local_inplane_angles_deg,
    local_perturbations,
    local_rotations,
    rotation_angle_deg,
    shift_grid_px,
    shift_step_px,
    so3_children,
    so3_grid_euler_deg,
    so3_grid_matrices,
    so3_grid_size,
    so3_level_for_step,
    so3_local_indices,
    so3_nearest,
    so3_neighbours,
    so3_step_deg,
)
from cryostack.errors import InvalidArgumentError


def _unit_vectors(theta: np.ndarray, phi: np.ndarray) -> np.ndarray:
    return np.stack([np.sin(theta) * np.cos(phi), np.sin(theta) * np.sin(phi), np.cos(theta)], axis=1)


def test_inplane_step_moves_the_rim_by_resolution_over_pi() -> None:
    step = inplane_angle_step_deg(resolution_a=20.0, particle_diameter_a=150.0)
    assert step == pytest.approx(math.degrees(20.0 / (math.pi * 75.0)))
    # Rim displacement of one step: radius × angle = resolution / π.
    assert 75.0 * math.radians(step) == pytest.approx(20.0 / math.pi)
    angles = inplane_angles_deg(20.0, 150.0)
    spacing = np.diff(np.append(angles, 360.0))
    np.testing.assert_allclose(spacing, spacing[0])
    assert spacing[0] <= step and spacing[0] > 0.95 * step
    assert angles[0] == 0.0 and angles[-1] < 360.0
    # Finer resolution, finer sampling.
    assert inplane_angles_deg(5.0, 150.0).size > 3 * angles.size


def test_local_inplane_angles_wrap_around_zero() -> None:
    angles = local_inplane_angles_deg(center_deg=358.0, step_deg=2.0, radius_deg=5.0)
    np.testing.assert_allclose(np.sort(angles), [0.0, 2.0, 354.0, 356.0, 358.0])


def test_shift_grid_is_a_lattice_of_resolution_sized_steps_in_a_disc() -> None:
    step = shift_step_px(resolution_a=12.0, pixel_size_a=2.0)
    assert step == pytest.approx(12.0 / (math.pi * 2.0))
    shifts = shift_grid_px(12.0, 2.0, max_shift_px=5.0, center_px=(1.5, -0.5))
    assert shifts.dtype == np.float32 and shifts.shape[1] == 2
    offsets = shifts - np.array([1.5, -0.5], dtype=np.float32)
    assert np.any(np.all(np.abs(offsets) < 1e-6, axis=1)), "the centre is on the grid"
    assert np.all(np.hypot(offsets[:, 0], offsets[:, 1]) <= 5.0 + 1e-5)
    np.testing.assert_allclose(offsets / step, np.round(offsets / step), atol=1e-5)
    # Every lattice point inside the disc is present (count against a direct enumeration).
    half = int(5.0 // step)
    lattice = [(i, j) for i in range(-half, half + 1) for j in range(-half, half + 1) if math.hypot(i, j) * step <= 5.0]
    assert shifts.shape[0] == len(lattice)
    # Default extent: a local search of three steps.
    local = shift_grid_px(12.0, 2.0)
    assert np.hypot(local[:, 0], local[:, 1]).max() == pytest.approx(3.0 * step, rel=1e-5)


@pytest.mark.parametrize("nside", [1, 2, 4, 8])
def test_healpix_rings_and_equal_areas(nside: int) -> None:
    theta, phi = healpix_pixel_angles(nside)
    z = np.round(np.cos(theta), 12)
    assert theta.size == 12 * nside**2
    assert np.unique(np.stack([z, np.round(phi, 9)], axis=1), axis=0).shape[0] == theta.size, "distinct centres"
    rings, counts = np.unique(z, return_counts=True)
    assert rings.size == 4 * nside - 1
    # North polar cap: ring i (1 .. nside-1) has 4i pixels at z = 1 - i²/(3 nside²); then 4·nside per ring.
    for i in range(1, nside):
        assert counts[rings == np.round(1 - i**2 / (3 * nside**2), 12)][0] == 4 * i
        assert counts[rings == np.round(-(1 - i**2 / (3 * nside**2)), 12)][0] == 4 * i
    assert np.all(counts[np.abs(rings) <= 2 / 3 + 1e-9] == 4 * nside)
    # Equal areas: the fraction of pixels above any height matches the area fraction of that cap, to one ring.
    for boundary in (0.5, 0.0, -0.3):
        assert np.mean(z > boundary) == pytest.approx((1 - boundary) / 2, abs=1 / (3 * nside))


@pytest.mark.parametrize("nside", [1, 2, 4])
def test_healpix_nesting_children_surround_their_parent(nside: int) -> None:
    parents = _unit_vectors(*healpix_pixel_angles(nside))
    children = _unit_vectors(*healpix_pixel_angles(2 * nside))
    # Each child's nearest coarse pixel centre is its own parent (nested numbering: child c has parent c // 4).
    assert np.array_equal(np.argmax(children @ parents.T, axis=1), np.arange(children.shape[0]) // 4)
    centroid = children.reshape(-1, 4, 3).mean(axis=1)
    centroid /= np.linalg.norm(centroid, axis=1, keepdims=True)
    spacing_deg = math.degrees(math.sqrt(4 * math.pi / parents.shape[0]))
    assert np.degrees(np.arccos(np.clip(np.sum(centroid * parents, axis=1), -1, 1))).max() < 0.1 * spacing_deg


def test_so3_grid_sizes_steps_and_angles() -> None:
    for level in range(4):
        assert so3_grid_size(level) == 72 * 8**level
        assert so3_step_deg(level) == 60.0 / 2**level
    assert so3_level_for_step(15.0) == 2 and so3_level_for_step(14.9) == 3 and so3_level_for_step(100.0) == 0
    euler = so3_grid_euler_deg(2)
    assert euler.shape == (4608, 3)
    assert np.all((euler[:, 1] >= 0) & (euler[:, 1] <= 180)) and np.all((euler[:, 2] > 0) & (euler[:, 2] < 360))
    np.testing.assert_allclose(np.unique(np.round(euler[:, 2], 9)), (np.arange(24) + 0.5) * 15.0)
    matrices = so3_grid_matrices(2, np.array([0, 17, 4607]))
    np.testing.assert_allclose(matrices, euler_to_matrix(*euler[[0, 17, 4607]].T))


@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_so3_grid_covers_rotations_within_its_nominal_step(level: int) -> None:
    rng = np.random.default_rng(level)
    rotations = uniform_random_rotations(4000, rng)
    index, distance = so3_nearest(level, rotations)
    assert distance.max() <= so3_step_deg(level)
    # The KD-tree answer is the true nearest grid rotation (brute force on a subset).
    grid = so3_grid_matrices(level)
    brute = np.array([rotation_angle_deg(r[None], grid).min() for r in rotations[:50]])
    np.testing.assert_allclose(distance[:50], brute, atol=1e-6)
    np.testing.assert_allclose(rotation_angle_deg(rotations[:50], grid[index[:50]]), brute, atol=1e-6)


@pytest.mark.parametrize("level", [1, 2])
def test_so3_grid_is_near_uniform(level: int) -> None:
    grid = so3_grid_matrices(level)
    neighbours = so3_neighbours(level)
    spacing = np.array([rotation_angle_deg(grid[i][None], grid[n]).min() for i, n in enumerate(neighbours)])
    # No two grid rotations crowd together, and every rotation has a full shell of neighbours.
    assert spacing.min() > 0.8 * so3_step_deg(level)
    assert spacing.max() < 1.05 * so3_step_deg(level)
    assert min(len(n) for n in neighbours) >= 12


def test_neighbours_are_near_and_symmetric() -> None:
    level = 2
    radius = 1.5 * so3_step_deg(level)
    sample = np.arange(0, so3_grid_size(level), 97)
    neighbours = so3_neighbours(level, sample)
    grid = so3_grid_matrices(level)
    for own, row in zip(sample, neighbours, strict=True):
        assert own not in row and row.size > 0
        assert np.all(rotation_angle_deg(grid[own][None], grid[row]) <= radius + 1e-9)
        # Brute force: exactly the grid rotations within the radius.
        brute = np.flatnonzero(rotation_angle_deg(grid[own][None], grid) <= radius + 1e-6)
        assert np.array_equal(np.sort(np.append(row, own)), brute)
        back = so3_neighbours(level, row)
        assert all(own in b for b in back)


@pytest.mark.parametrize("level", [0, 1, 2])
def test_children_partition_the_finer_grid_near_their_parents(level: int) -> None:
    parents = np.arange(so3_grid_size(level))
    children = so3_children(level, parents)
    assert children.shape == (parents.size, 8)
    assert np.array_equal(np.sort(children.ravel()), np.arange(so3_grid_size(level + 1)))
    child_matrices = so3_grid_matrices(level + 1, children.ravel()).reshape(-1, 8, 3, 3)
    distance = rotation_angle_deg(so3_grid_matrices(level)[:, None], child_matrices)
    limit = 0.6 if level == 0 else 0.7  # the 12 base pixels are the least regular
    assert distance.max() <= limit * so3_step_deg(level)


@pytest.mark.parametrize("level", [1, 2])
def test_refinement_halves_the_step(level: int) -> None:
    rng = np.random.default_rng(10 + level)
    rotations = uniform_random_rotations(2000, rng)
    coarse_index, coarse_distance = so3_nearest(level, rotations)
    fine_index, fine_distance = so3_nearest(level + 1, rotations)
    assert so3_step_deg(level + 1) == so3_step_deg(level) / 2
    assert fine_distance.max() <= so3_step_deg(level + 1)
    assert np.median(fine_distance) == pytest.approx(np.median(coarse_distance) / 2, rel=0.1)
    # Coarse to fine: the finer grid within 1.5 coarse steps (both covering radii) of the coarse answer contains
    # the global fine answer, and the best of the coarse answer's 8 children is within about one fine step.
    coarse = so3_grid_matrices(level, coarse_index)
    local = so3_local_indices(level + 1, coarse, 1.5 * so3_step_deg(level))
    assert all(f in row for f, row in zip(fine_index, local, strict=True))
    children = so3_grid_matrices(level + 1, so3_children(level, coarse_index).ravel()).reshape(-1, 8, 3, 3)
    best_child = rotation_angle_deg(rotations[:, None], children).min(axis=1)
    assert best_child.max() <= 1.15 * so3_step_deg(level + 1)
    assert np.median(best_child) <= 1.1 * np.median(fine_distance)


def test_local_rotations_cover_a_ball_around_each_rotation() -> None:
    rng = np.random.default_rng(3)
    centres = uniform_random_rotations(5, rng)
    local = local_rotations(centres, step_deg=2.0, radius_deg=6.0)
    assert local.shape[:2] == (5, local_perturbations(2.0, 6.0).shape[0])
    np.testing.assert_allclose(local[:, 0], centres, atol=1e-12)
    assert rotation_angle_deg(centres[:, None], local).max() <= 6.0 + 1e-9
    # Any rotation within 4° of a centre is within the cubic lattice's covering radius (step·√3/2) of a grid point.
    offsets = Rotation.from_rotvec(rng.normal(size=(200, 3))).as_rotvec()
    offsets *= np.radians(rng.uniform(0, 4.0, size=(200, 1))) / np.linalg.norm(offsets, axis=1, keepdims=True)
    targets = centres[0] @ Rotation.from_rotvec(offsets).as_matrix()
    nearest = rotation_angle_deg(targets[:, None], local[0][None]).min(axis=1)
    assert nearest.max() <= 2.0 * math.sqrt(3) / 2 * 1.02


def test_rotation_angle_matches_scipy() -> None:
    rng = np.random.default_rng(4)
    a = uniform_random_rotations(50, rng)
    b = uniform_random_rotations(50, rng)
    expected = np.degrees(Rotation.from_matrix(np.swapaxes(a, 1, 2) @ b).magnitude())
    np.testing.assert_allclose(rotation_angle_deg(a, b), expected, atol=1e-6)


def test_bad_arguments_raise() -> None:
    with pytest.raises(InvalidArgumentError):
        inplane_angle_step_deg(0.0, 100.0)
    with pytest.raises(InvalidArgumentError):
        shift_grid_px(10.0, -1.0)
    with pytest.raises(InvalidArgumentError):
        healpix_pixel_angles(3)
    with pytest.raises(InvalidArgumentError):
        so3_grid_euler_deg(1, np.array([576]))
    with pytest.raises(InvalidArgumentError):
        so3_grid_size(-1)
    with pytest.raises(InvalidArgumentError):
        local_rotations(np.eye(2), 1.0, 2.0)
