"""Pose grids for the search: in-plane angles, shifts and a near-uniform, hierarchical SO(3) grid.

Sampling is sized to the current resolution the way RELION and cryoSPARC size it: an angular step moves a point
on the particle's rim by about ``resolution / π``, and a shift step is that same distance, so a pose half a step
away from the truth is off by at most ``resolution / (2π)`` anywhere in the particle.

The SO(3) grid is HEALPix × ψ (RELION's sampling, equivalent up to a per-fibre ψ offset to the Hopf-fibration
grid of Yershova et al., 2010). At level ``l``: ``N_side = 2**l``, the viewing directions are the centres of the
``12 N_side²`` HEALPix pixels (nested numbering), the in-plane angle takes ``6 N_side`` values
``ψ_j = (j + ½)·360° / (6 N_side)``, and the nominal step is ``60° / N_side`` (30° at level 1, 15° at level 2,
7.5° at level 3, 3.75° at level 4); a random rotation lies within about 0.9 step of the nearest grid rotation.
Grid index ``i = pixel · 6 N_side + j``. The hierarchy nests: each rotation has 8 children at level ``l + 1``
(:func:`so3_children`: the 4 nested sub-pixels of its direction × 2 in-plane angles), so coarse-to-fine search
refines a pose in place; :func:`so3_local_indices` gives the finer grid within any radius of given rotations.

Angles are RELION's ZYZ Euler angles ``(rot, tilt, psi)`` in degrees, with ``rot`` the HEALPix longitude φ,
``tilt`` its colatitude θ and ``psi`` the in-plane angle. Rotation matrices (:mod:`cryostack.core.geometry`)
follow RELION's ``Euler_angles2matrix``: they map volume coordinates ``(x, y, z)`` into the particle's frame.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from scipy.spatial import cKDTree
from scipy.spatial.transform import Rotation

from cryostack.core.geometry import euler_to_matrix, matrix_to_quaternion
from cryostack.errors import InvalidArgumentError

# HEALPix base-resolution tables: ring index (in units of N_side) and longitude index of each of the 12 faces.
_FACE_RING = np.array([2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4], dtype=np.int64)
_FACE_LONGITUDE = np.array([1, 3, 5, 7, 0, 2, 4, 6, 1, 3, 5, 7], dtype=np.int64)

# Deepest level the grid functions accept: 72·8**8 ≈ 1.2e9 rotations, far beyond any useful sampling (0.23°).
MAX_SO3_LEVEL = 8


def inplane_angle_step_deg(resolution_a: float, particle_diameter_a: float) -> float:
    """In-plane angular step (degrees) that moves the particle's rim by ``resolution / π``."""
    _check_positive("resolution_a", resolution_a)
    _check_positive("particle_diameter_a", particle_diameter_a)
    radius_a = particle_diameter_a / 2.0
    return min(360.0, math.degrees(resolution_a / (math.pi * radius_a)))


def inplane_angles_deg(resolution_a: float, particle_diameter_a: float) -> np.ndarray:
    """Uniform in-plane angles over [0°, 360°) with a step no coarser than :func:`inplane_angle_step_deg`."""
    count = math.ceil(360.0 / inplane_angle_step_deg(resolution_a, particle_diameter_a) - 1e-9)
    return np.arange(count, dtype=np.float64) * (360.0 / count)  # (P,) float64


def local_inplane_angles_deg(center_deg: float, step_deg: float, radius_deg: float) -> np.ndarray:
    """In-plane angles within ``radius_deg`` of ``center_deg`` at ``step_deg``, wrapped into [0°, 360°)."""
    _check_positive("step_deg", step_deg)
    if radius_deg < 0:
        raise InvalidArgumentError("radius_deg", f"must be non-negative, got {radius_deg}")
    half_count = math.floor(radius_deg / step_deg + 1e-9)
    offsets = np.arange(-half_count, half_count + 1, dtype=np.float64) * step_deg
    return np.mod(center_deg + offsets, 360.0)  # (P,) float64


def shift_step_px(resolution_a: float, pixel_size_a: float) -> float:
    """Translational step (pixels) of ``resolution / π``, matching the angular sampling's rim displacement."""
    _check_positive("resolution_a", resolution_a)
    _check_positive("pixel_size_a", pixel_size_a)
    return resolution_a / (math.pi * pixel_size_a)


def shift_grid_px(
    resolution_a: float,
    pixel_size_a: float,
    max_shift_px: float | None = None,
    center_px: tuple[float, float] = (0.0, 0.0),
) -> np.ndarray:
    """Shifts ``(x, y)`` in pixels on a square lattice sized to the resolution, inside a disc around ``center_px``.

    The lattice step is :func:`shift_step_px`; the disc radius is ``max_shift_px`` (a global search range), or
    three steps when omitted (a local search around the current shift). The centre itself is always included.
    """
    step_px = shift_step_px(resolution_a, pixel_size_a)
    radius_px = 3.0 * step_px if max_shift_px is None else float(max_shift_px)
    if radius_px < 0:
        raise InvalidArgumentError("max_shift_px", f"must be non-negative, got {max_shift_px}")
    half_count = math.floor(radius_px / step_px + 1e-9)
    axis = np.arange(-half_count, half_count + 1, dtype=np.float64) * step_px
    grid_x, grid_y = np.meshgrid(axis, axis, indexing="xy")
    offsets = np.stack([grid_x.ravel(), grid_y.ravel()], axis=1)  # (S, 2) float64, (x, y)
    inside = np.hypot(offsets[:, 0], offsets[:, 1]) <= radius_px * (1 + 1e-9)
    return (offsets[inside] + np.asarray(center_px, dtype=np.float64)).astype(np.float32)  # (S, 2) float32


def healpix_pixel_angles(nside: int, pixels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Centres ``(theta, phi)`` in radians of HEALPix pixels in the nested scheme (all pixels when None)."""
    order = _nside_order(nside)
    npix = 12 * nside * nside
    pix = np.arange(npix, dtype=np.int64) if pixels is None else np.asarray(pixels, dtype=np.int64)
    if pix.size and (pix.min() < 0 or pix.max() >= npix):
        raise InvalidArgumentError("pixels", f"indices must lie in [0, {npix})")
    face = pix >> (2 * order)
    within_face = pix & (nside * nside - 1)
    ix = _even_bits(within_face, order)
    iy = _even_bits(within_face >> 1, order)

    # Ring number counted from the north pole (1 .. 4·N_side - 1) and the ring's pixel count per quadrant.
    ring = _FACE_RING[face] * nside - ix - iy - 1
    north = ring < nside
    south = ring > 3 * nside
    ring_quadrant = np.where(north, ring, np.where(south, 4 * nside - ring, nside))
    cap_height = ring_quadrant.astype(np.float64) ** 2 / (3.0 * nside * nside)
    z = np.where(north, 1.0 - cap_height, np.where(south, cap_height - 1.0, (2 * nside - ring) * 2.0 / (3.0 * nside)))
    longitude_index = _FACE_LONGITUDE[face] * ring_quadrant + ix - iy
    longitude_index = np.where(longitude_index < 0, longitude_index + 8 * ring_quadrant, longitude_index)
    phi = np.mod(longitude_index * (np.pi / 4.0) / ring_quadrant, 2.0 * np.pi)
    theta = np.arccos(np.clip(z, -1.0, 1.0))
    return theta, phi  # (P,) float64 each


def so3_grid_size(level: int) -> int:
    """Number of rotations in the SO(3) grid at ``level`` (72 · 8**level)."""
    _check_level(level)
    return 72 * 8**level


def so3_step_deg(level: int) -> float:
    """Nominal angular step (degrees) of the SO(3) grid at ``level`` (60° / 2**level)."""
    _check_level(level)
    return 60.0 / 2**level


def so3_level_for_step(step_deg: float) -> int:
    """The coarsest grid level whose nominal step is at most ``step_deg``."""
    _check_positive("step_deg", step_deg)
    level = max(0, math.ceil(math.log2(60.0 / step_deg) - 1e-9))
    if level > MAX_SO3_LEVEL:
        raise InvalidArgumentError("step_deg", f"{step_deg}° needs a grid finer than level {MAX_SO3_LEVEL}")
    return level


def so3_grid_euler_deg(level: int, indices: np.ndarray | None = None) -> np.ndarray:
    """RELION Euler angles ``(rot, tilt, psi)`` in degrees of grid rotations (the whole grid when None)."""
    nside = 2**level
    n_psi = 6 * nside
    idx = _grid_indices(level, indices)
    theta, phi = healpix_pixel_angles(nside, idx // n_psi)
    psi_deg = ((idx % n_psi) + 0.5) * (360.0 / n_psi)
    return np.stack([np.degrees(phi), np.degrees(theta), psi_deg], axis=-1)  # (R, 3) float64


def so3_grid_matrices(level: int, indices: np.ndarray | None = None) -> np.ndarray:
    """Rotation matrices (RELION convention) of grid rotations (the whole grid when None)."""
    euler = so3_grid_euler_deg(level, indices)
    return euler_to_matrix(euler[:, 0], euler[:, 1], euler[:, 2])  # (R, 3, 3) float64


def so3_children(level: int, indices: np.ndarray) -> np.ndarray:
    """Indices at ``level + 1`` of the 8 children of each given grid rotation at ``level``.

    The children are the 4 nested HEALPix sub-pixels of the parent's direction, each with the 2 finer in-plane
    angles that bracket the in-plane angle closest to the parent rotation. Near the poles ZYZ couples ``rot``
    and ``psi`` (only ``rot ± psi`` matters there), so halving the parent's own ``psi`` index would drift away
    from the parent; bracketing the closest angle keeps every child within about one finer step of it.
    """
    _check_level(level + 1)
    idx = _grid_indices(level, indices)
    n_psi_child = 12 * 2**level
    parents = so3_grid_matrices(level, idx)  # (K, 3, 3)
    child_pixels = 4 * (idx // (6 * 2**level))[:, None] + np.arange(4, dtype=np.int64)  # (K, 4)
    theta, phi = healpix_pixel_angles(2 * 2**level, child_pixels.ravel())
    # A(rot, tilt, psi) = Rz(psi)ᵀ · A(rot, tilt, 0), so with N = A(rot, tilt, 0) · Pᵀ,
    # tr(A · Pᵀ) = cos ψ (N00 + N11) + sin ψ (N10 - N01) + N22; its maximum over ψ is the angle closest to P.
    unrotated = euler_to_matrix(np.degrees(phi), np.degrees(theta), 0.0).reshape(-1, 4, 3, 3)  # (K, 4, 3, 3)
    n = np.einsum("kcij,klj->kcil", unrotated, parents)  # (K, 4, 3, 3)
    best_psi_deg = np.degrees(np.arctan2(n[..., 1, 0] - n[..., 0, 1], n[..., 0, 0] + n[..., 1, 1]))  # (K, 4)
    psi_step_deg = 360.0 / n_psi_child
    lower = np.floor(np.mod(best_psi_deg, 360.0) / psi_step_deg - 0.5).astype(np.int64)
    child_psi = np.mod(lower[..., None] + np.arange(2, dtype=np.int64), n_psi_child)  # (K, 4, 2)
    children = child_pixels[:, :, None] * n_psi_child + child_psi
    return children.reshape(idx.shape[0], 8)  # (K, 8) int64


def so3_nearest(level: int, rotations: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each rotation ``(K, 3, 3)``: the nearest grid index at ``level`` and the geodesic distance in degrees."""
    quats = _canonical_quaternions(_as_matrices(rotations))
    tree = _grid_tree(level)
    chord, index = tree.query(quats)
    # Each grid rotation is stored twice (q and -q), so tree rows map back to grid indices modulo the grid size.
    return index % so3_grid_size(level), _chord_to_angle_deg(chord)


def so3_local_indices(level: int, rotations: np.ndarray, radius_deg: float) -> list[np.ndarray]:
    """For each rotation ``(K, 3, 3)``: sorted indices of the level's grid rotations within ``radius_deg`` of it.

    Queries a KD-tree of the level's whole grid, built once per level (cached; about 1 s at level 4, whose
    295k rotations suffice for 3.75° searches; beyond that, refine with :func:`so3_children` instead).
    """
    _check_positive("radius_deg", radius_deg)
    quats = _canonical_quaternions(_as_matrices(rotations))
    tree = _grid_tree(level)
    size = so3_grid_size(level)
    chord_radius = 2.0 * math.sin(math.radians(min(radius_deg, 180.0)) / 4.0)
    hits = tree.query_ball_point(quats, r=chord_radius * (1 + 1e-9))
    return [np.unique(np.asarray(row, dtype=np.int64) % size) for row in hits]


def so3_neighbours(level: int, indices: np.ndarray | None = None, radius_deg: float | None = None) -> list[np.ndarray]:
    """Grid neighbours of grid rotations: indices within ``radius_deg`` (default 1.5 steps), self excluded."""
    idx = _grid_indices(level, indices)
    radius = 1.5 * so3_step_deg(level) if radius_deg is None else radius_deg
    local = so3_local_indices(level, so3_grid_matrices(level, idx), radius)
    return [row[row != own] for row, own in zip(local, idx, strict=True)]


def local_rotations(rotations: np.ndarray, step_deg: float, radius_deg: float) -> np.ndarray:
    """A local grid around each rotation ``(K, 3, 3)``: ``R · Δ`` for small rotations Δ on a cubic lattice.

    The Δ are the rotation vectors of a cubic lattice of spacing ``step_deg`` inside a ball of ``radius_deg``;
    the identity is always included, first. Returns ``(K, P, 3, 3)`` float64.
    """
    matrices = _as_matrices(rotations)
    deltas = local_perturbations(step_deg, radius_deg)  # (P, 3, 3)
    return np.einsum("kij,pjl->kpil", matrices, deltas)


def local_perturbations(step_deg: float, radius_deg: float) -> np.ndarray:
    """Small rotations ``(P, 3, 3)`` whose rotation vectors lie on a cubic lattice, identity first."""
    _check_positive("step_deg", step_deg)
    if radius_deg < 0:
        raise InvalidArgumentError("radius_deg", f"must be non-negative, got {radius_deg}")
    half_count = math.floor(radius_deg / step_deg + 1e-9)
    axis = np.arange(-half_count, half_count + 1, dtype=np.float64)
    lattice = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), axis=-1).reshape(-1, 3) * step_deg
    lengths = np.linalg.norm(lattice, axis=1)
    lattice = lattice[lengths <= radius_deg * (1 + 1e-9)]
    lattice = lattice[np.argsort(np.linalg.norm(lattice, axis=1), kind="stable")]
    return Rotation.from_rotvec(np.radians(lattice)).as_matrix()  # (P, 3, 3) float64


def rotation_angle_deg(rotations_a: np.ndarray, rotations_b: np.ndarray) -> np.ndarray:
    """Geodesic angle (degrees) between paired rotation matrices ``(..., 3, 3)``: the angle of ``Aᵀ B``."""
    a = np.asarray(rotations_a, dtype=np.float64)
    b = np.asarray(rotations_b, dtype=np.float64)
    trace = np.einsum("...ij,...ij->...", a, b)
    return np.degrees(np.arccos(np.clip((trace - 1.0) / 2.0, -1.0, 1.0)))


def _grid_indices(level: int, indices: np.ndarray | None) -> np.ndarray:
    size = so3_grid_size(level)
    if indices is None:
        return np.arange(size, dtype=np.int64)
    idx = np.atleast_1d(np.asarray(indices, dtype=np.int64))
    if idx.size and (idx.min() < 0 or idx.max() >= size):
        raise InvalidArgumentError("indices", f"grid indices at level {level} must lie in [0, {size})")
    return idx


@functools.lru_cache(maxsize=6)
def _grid_tree(level: int) -> cKDTree:
    # Unit quaternions double-cover SO(3); storing both signs makes Euclidean (chordal) distance in R^4 a
    # monotone function of the geodesic angle, so a KD-tree answers nearest and radius queries exactly.
    quats = _canonical_quaternions(so3_grid_matrices(level))
    return cKDTree(np.concatenate([quats, -quats], axis=0))


def _canonical_quaternions(matrices: np.ndarray) -> np.ndarray:
    return matrix_to_quaternion(matrices.reshape(-1, 3, 3))  # (K, 4) float64, w >= 0


def _chord_to_angle_deg(chord: np.ndarray) -> np.ndarray:
    # |q1 - q2| = 2 sin(θ/4) for unit quaternions on the same hemisphere, θ the rotation angle between them.
    return np.degrees(4.0 * np.arcsin(np.clip(np.asarray(chord) / 2.0, 0.0, 1.0)))


def _as_matrices(rotations: np.ndarray) -> np.ndarray:
    matrices = np.asarray(rotations, dtype=np.float64)
    if matrices.ndim == 2:
        matrices = matrices[None]
    if matrices.ndim != 3 or matrices.shape[1:] != (3, 3):
        raise InvalidArgumentError("rotations", f"expected (K, 3, 3) rotation matrices, got {matrices.shape}")
    return matrices


def _even_bits(values: np.ndarray, order: int) -> np.ndarray:
    out = np.zeros_like(values)
    for bit in range(order):
        out |= ((values >> (2 * bit)) & 1) << bit
    return out


def _nside_order(nside: int) -> int:
    if nside < 1 or nside & (nside - 1):
        raise InvalidArgumentError("nside", f"must be a power of two, got {nside}")
    return nside.bit_length() - 1


def _check_level(level: int) -> None:
    if not 0 <= level <= MAX_SO3_LEVEL:
        raise InvalidArgumentError("level", f"must lie in [0, {MAX_SO3_LEVEL}], got {level}")


def _check_positive(field: str, value: float) -> None:
    if not value > 0 or not math.isfinite(value):
        raise InvalidArgumentError(field, f"must be positive and finite, got {value}")
