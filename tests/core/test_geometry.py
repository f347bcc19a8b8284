"""RELION ZYZ Euler angles, quaternions and in-plane rotations against known values and scipy."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from cryostack.core.geometry import (
    euler_to_matrix,
    matrix_to_euler,
    matrix_to_euler_deg,
    matrix_to_quaternion,
    quaternion_to_matrix,
    relion_origin_to_shift_px,
    rotation_matrix_2d,
    shift_px_to_relion_origin,
    uniform_random_rotations,
)
from cryostack.errors import InvalidArgumentError


def test_known_relion_matrices() -> None:
    # Rz(90) in RELION's (passive) form maps x to -y.
    np.testing.assert_allclose(euler_to_matrix(90, 0, 0), [[0, 1, 0], [-1, 0, 0], [0, 0, 1]], atol=1e-15)
    np.testing.assert_allclose(euler_to_matrix(0, 90, 0), [[0, 0, -1], [0, 1, 0], [1, 0, 0]], atol=1e-15)


def test_euler_matrices_match_scipy_zyz_transposed() -> None:
    rng = np.random.default_rng(0)
    angles = rng.uniform([-180, 0, -180], [180, 180, 180], size=(50, 3))
    ours = euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2])
    # RELION's A = Rz(psi)·Ry(tilt)·Rz(rot) of passive rotations = (active intrinsic ZYZ rot, tilt, psi)ᵀ.
    reference = Rotation.from_euler("ZYZ", angles, degrees=True).as_matrix().transpose(0, 2, 1)
    np.testing.assert_allclose(ours, reference, atol=1e-12)
    np.testing.assert_allclose(ours @ ours.transpose(0, 2, 1), np.broadcast_to(np.eye(3), (50, 3, 3)), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(ours), 1, atol=1e-12)


def test_matrix_to_euler_round_trip_including_gimbal_lock() -> None:
    rng = np.random.default_rng(1)
    angles = rng.uniform([-180, 0, -180], [180, 180, 180], size=(40, 3))
    angles[:3, 1] = [0.0, 180.0, 1e-9]
    matrices = euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2])
    rot, tilt, psi = matrix_to_euler(matrices)
    assert np.all((tilt >= 0) & (tilt <= 180))
    np.testing.assert_allclose(euler_to_matrix(rot, tilt, psi), matrices, atol=1e-9)
    np.testing.assert_allclose(np.stack([rot, tilt, psi], -1)[5:], angles[5:], atol=1e-9)


def test_quaternions_match_scipy_and_round_trip() -> None:
    rng = np.random.default_rng(2)
    q = rng.standard_normal((30, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    matrices = quaternion_to_matrix(q)
    np.testing.assert_allclose(matrices, Rotation.from_quat(q[:, [1, 2, 3, 0]]).as_matrix(), atol=1e-12)
    back = matrix_to_quaternion(matrices)
    np.testing.assert_allclose(back, q * np.sign(q[:, :1]), atol=1e-12)


def test_in_plane_matrix_is_relion_psi_block() -> None:
    psi = np.array([0.0, 30.0, -125.0])
    np.testing.assert_allclose(rotation_matrix_2d(psi), euler_to_matrix(0.0, 0.0, psi)[:, :2, :2], atol=1e-15)


def test_relion_origin_sign_and_units() -> None:
    np.testing.assert_allclose(relion_origin_to_shift_px(np.array([3.0, -6.0]), 1.5), [-2.0, 4.0])


def test_uniform_rotations_have_zero_mean() -> None:
    rotations = uniform_random_rotations(4000, np.random.default_rng(3))
    # E[R] = 0 for the Haar measure; the sample mean has a standard deviation of about 1/sqrt(3·4000).
    assert np.abs(rotations.mean(axis=0)).max() < 0.05
    assert rotations.shape == (4000, 3, 3)


@pytest.mark.parametrize("bad", [np.zeros((2, 3)), np.zeros((4, 3, 2))])
def test_bad_shapes_raise(bad: np.ndarray) -> None:
    with pytest.raises(InvalidArgumentError):
        matrix_to_euler(bad)


def test_relion_origins_and_image_shifts_convert_both_ways_and_stacked_euler_angles_rebuild_the_matrices() -> None:
    rng = np.random.default_rng(9)
    shifts = rng.normal(0.0, 3.0, (20, 2))
    origins = shift_px_to_relion_origin(shifts, 1.5)
    np.testing.assert_allclose(origins, -1.5 * shifts)
    np.testing.assert_allclose(relion_origin_to_shift_px(origins, 1.5), shifts, atol=1e-12)
    matrices = uniform_random_rotations(20, rng)
    euler = matrix_to_euler_deg(matrices)
    assert euler.shape == (20, 3)
    np.testing.assert_allclose(euler_to_matrix(euler[:, 0], euler[:, 1], euler[:, 2]), matrices, atol=1e-9)
    with pytest.raises(InvalidArgumentError):
        shift_px_to_relion_origin(shifts, 0.0)
