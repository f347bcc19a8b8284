"""Rotation conventions of cryostack, defined once: RELION's ZYZ Euler angles, quaternions, in-plane rotations.

Euler angles. ``(rot, tilt, psi)`` in degrees (``rlnAngleRot``, ``rlnAngleTilt``, ``rlnAnglePsi``) give the matrix

    A = Rz(psi) · Ry(tilt) · Rz(rot),   Rz(a) = [[cos a, sin a, 0], [-sin a, cos a, 0], [0, 0, 1]],
                                        Ry(b) = [[cos b, 0, -sin b], [0, 1, 0], [sin b, 0, cos b]],

exactly RELION's ``Euler_angles2matrix``. The projection at A is the line integral along z of the volume rotated
by A, ``P_A(x, y) = ∫ V(Aᵀ (x, y, z)) dz``; by the central-slice theorem its transform at 2D frequency
``(kx, ky)`` is the volume's transform at ``Aᵀ (kx, ky, 0) = kx·A[0] + ky·A[1]`` (the first two rows of A).
Coordinates are ``(x, y, z)`` = (column, row, section) of an array indexed ``[z, y, x]``.

In-plane rotations. :func:`rotation_matrix_2d` of ``psi`` is the in-plane block of ``euler_to_matrix(0, 0, psi)``,
``[[cos psi, sin psi], [-sin psi, cos psi]]``; an image rotated by it is sampled at ``Aᵀ (x, y)``, so rotating the
projection at ``(rot, tilt, 0)`` by ``psi`` gives the projection at ``(rot, tilt, psi)``.

Quaternions. ``(w, x, y, z)``, scalar first, unit norm; :func:`quaternion_to_matrix` gives the usual active
rotation matrix of the quaternion, which may stand wherever a matrix A above is expected.

Origins. RELION 3.1's ``rlnOriginXAngst/YAngst`` ``(ox, oy)`` is where the particle's centre sits relative to
the image centre with its sign flipped: the particle image is the centred projection translated by
``-(ox, oy) / pixel_size_a`` pixels (content moved towards ``-ox`` along x), i.e. the image is
``phase_shift_2d(P_A, -origin_px)``; shifting the image by ``+origin_px`` recentres it. This sign was pinned
against projections made by RELION's own ``relion_project`` (tests/core/test_projection.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cryostack.core.backend import array_module
from cryostack.errors import InvalidArgumentError

# Below this |sin(tilt)| the ZYZ decomposition is degenerate (gimbal lock) and rot is set to 0, as RELION does.
_GIMBAL_EPS = 16 * np.finfo(np.float32).eps


def euler_to_matrix(rot_deg: Any, tilt_deg: Any, psi_deg: Any) -> Any:
    """RELION ZYZ Euler angles in degrees (broadcast shapes S) to rotation matrices A: (*S, 3, 3) float64."""
    xp = array_module(rot_deg, tilt_deg, psi_deg)
    a, b, g = (xp.deg2rad(xp.asarray(v, dtype=np.float64)) for v in (rot_deg, tilt_deg, psi_deg))
    a, b, g = xp.broadcast_arrays(a, b, g)
    ca, sa, cb, sb, cg, sg = xp.cos(a), xp.sin(a), xp.cos(b), xp.sin(b), xp.cos(g), xp.sin(g)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    rows = [
        [cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb],
        [-sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb],
        [sc, ss, cb],
    ]
    return xp.stack([xp.stack(row, axis=-1) for row in rows], axis=-2)


def matrix_to_euler(matrices: Any) -> tuple[Any, Any, Any]:
    """Rotation matrices (..., 3, 3) to RELION ZYZ angles (rot, tilt, psi) in degrees, tilt in [0, 180]."""
    xp = array_module(matrices)
    m = xp.asarray(matrices, dtype=np.float64)
    if m.shape[-2:] != (3, 3):
        raise InvalidArgumentError("matrices", f"expected (..., 3, 3), got {m.shape}")
    abs_sb = xp.sqrt(m[..., 0, 2] ** 2 + m[..., 1, 2] ** 2)
    regular = abs_sb > _GIMBAL_EPS
    tilt = xp.arctan2(abs_sb, m[..., 2, 2])
    rot = xp.where(regular, xp.arctan2(m[..., 2, 1], m[..., 2, 0]), 0.0)
    psi_regular = xp.arctan2(m[..., 1, 2], -m[..., 0, 2])
    # With sin(tilt) = 0 only rot + psi (tilt 0) or psi - rot (tilt 180) is defined; put it all in psi.
    psi_up = xp.arctan2(-m[..., 1, 0], m[..., 0, 0])
    psi_down = xp.arctan2(m[..., 1, 0], -m[..., 0, 0])
    psi = xp.where(regular, psi_regular, xp.where(m[..., 2, 2] > 0, psi_up, psi_down))
    tilt = xp.where(regular, tilt, xp.where(m[..., 2, 2] > 0, 0.0, np.pi))
    return xp.rad2deg(rot), xp.rad2deg(tilt), xp.rad2deg(psi)


def quaternion_to_matrix(quaternions: Any) -> Any:
    """Quaternions (..., 4) as (w, x, y, z), normalised here, to rotation matrices (..., 3, 3) float64."""
    xp = array_module(quaternions)
    q = xp.asarray(quaternions, dtype=np.float64)
    if q.shape[-1] != 4:
        raise InvalidArgumentError("quaternions", f"expected (..., 4), got {q.shape}")
    norm = xp.linalg.norm(q, axis=-1, keepdims=True)
    if bool(xp.any(norm == 0)):
        raise InvalidArgumentError("quaternions", "zero quaternion has no rotation")
    w, x, y, z = xp.moveaxis(q / norm, -1, 0)
    rows = [
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ]
    return xp.stack([xp.stack(row, axis=-1) for row in rows], axis=-2)


def matrix_to_quaternion(matrices: Any) -> Any:
    """Rotation matrices (..., 3, 3) to unit quaternions (..., 4) as (w, x, y, z) with w >= 0."""
    xp = array_module(matrices)
    m = xp.asarray(matrices, dtype=np.float64)
    if m.shape[-2:] != (3, 3):
        raise InvalidArgumentError("matrices", f"expected (..., 3, 3), got {m.shape}")
    m00, m11, m22 = m[..., 0, 0], m[..., 1, 1], m[..., 2, 2]
    # Four candidate solutions; each is accurate where its leading component is large (Shepperd's method).
    candidates = xp.stack(
        [
            xp.stack([1 + m00 + m11 + m22, m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0],
                      m[..., 1, 0] - m[..., 0, 1]], axis=-1),
            xp.stack([m[..., 2, 1] - m[..., 1, 2], 1 + m00 - m11 - m22, m[..., 0, 1] + m[..., 1, 0],
                      m[..., 0, 2] + m[..., 2, 0]], axis=-1),
            xp.stack([m[..., 0, 2] - m[..., 2, 0], m[..., 0, 1] + m[..., 1, 0], 1 - m00 + m11 - m22,
                      m[..., 1, 2] + m[..., 2, 1]], axis=-1),
            xp.stack([m[..., 1, 0] - m[..., 0, 1], m[..., 0, 2] + m[..., 2, 0], m[..., 1, 2] + m[..., 2, 1],
                      1 - m00 - m11 + m22], axis=-1),
        ],
        axis=-2,
    )  # (..., 4 candidates, 4)
    leading = xp.stack([1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22], -1)
    best = xp.argmax(leading, axis=-1)
    q = xp.take_along_axis(candidates, best[..., None, None], axis=-2)[..., 0, :]
    q = q / xp.linalg.norm(q, axis=-1, keepdims=True)
    return xp.where(q[..., :1] < 0, -q, q)


def rotation_matrix_2d(angle_deg: Any) -> Any:
    """In-plane rotation matrices ``[[cos, sin], [-sin, cos]]`` (RELION's psi block): (*S, 2, 2) float64."""
    xp = array_module(angle_deg)
    a = xp.deg2rad(xp.asarray(angle_deg, dtype=np.float64))
    c, s = xp.cos(a), xp.sin(a)
    return xp.stack([xp.stack([c, s], axis=-1), xp.stack([-s, c], axis=-1)], axis=-2)


def uniform_random_rotations(count: int, rng: np.random.Generator) -> np.ndarray:
    """Rotation matrices drawn uniformly from SO(3) (normalised Gaussian quaternions): (count, 3, 3) float64."""
    q = rng.standard_normal((count, 4))
    return quaternion_to_matrix(q)


def relion_origin_to_shift_px(origin_xy_a: Any, pixel_size_a: float) -> Any:
    """Image-space shift (sx, sy) in pixels that turns a centred projection into the RELION particle image.

    ``origin_xy_a`` (..., 2) holds ``(rlnOriginXAngst, rlnOriginYAngst)``; the result is ``-origin / pixel_size``
    (see the module docstring), to be used with :func:`cryostack.core.fourier.phase_shift_2d`.
    """
    if not pixel_size_a > 0:
        raise InvalidArgumentError("pixel_size_a", f"must be positive, got {pixel_size_a}")
    xp = array_module(origin_xy_a)
    return -xp.asarray(origin_xy_a, dtype=np.float64) / float(pixel_size_a)


def shift_px_to_relion_origin(shift_px: Any, pixel_size_a: float) -> Any:
    """``(rlnOriginXAngst, rlnOriginYAngst)`` (..., 2) float64 of image shifts (sx, sy) in pixels: the inverse of
    :func:`relion_origin_to_shift_px`."""
    if not pixel_size_a > 0:
        raise InvalidArgumentError("pixel_size_a", f"must be positive, got {pixel_size_a}")
    xp = array_module(shift_px)
    return -xp.asarray(shift_px, dtype=np.float64) * float(pixel_size_a)


def matrix_to_euler_deg(matrices: Any) -> Any:
    """RELION ``(rot, tilt, psi)`` in degrees of rotation matrices (N, 3, 3), stacked as (N, 3) float64."""
    xp = array_module(matrices)
    return xp.stack(matrix_to_euler(matrices), axis=-1)
