"""Phantom proteins with known conformations: a rigid core plus a flexible domain on a hinge.

Conventions (shared with the projector and the MRC writer):

- A volume is a real-space array indexed ``[z, y, x]`` (MRC order), shape ``(D, D, D)``, float32, with its
  origin at index ``D // 2`` on every axis (the centre of a centred FFT), odd or even ``D``.
- Density is in arbitrary units on a fixed grey scale: zero in the solvent, positive in the protein, peak
  density about 1 whatever the box size, so maps from different runs compare directly.
- Positions are given as ``(x, y, z)`` in fractions of the box edge, so a phantom fills the same part of the box
  (about 60% of its diameter) at any ``D``; the pixel size only labels the grid.

A conformation is a ``(hinge_angle_deg, domain_present)`` pair. :class:`BlobPhantom` is the built-in protein, a
sum of anisotropic Gaussian blobs arranged without any mirror symmetry (so the hand is defined);
:class:`MapPhantom` turns any input map into a core and a domain by a soft cut, so the same scenarios run on a
real structure. Both expose ``volume(hinge_angle_deg, domain_present)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from cryostack.core.backend import fft_module, fft_workers
from cryostack.errors import InvalidArgumentError


class ConformationSource(Protocol):
    """Anything that renders the volume of one conformation of a hinged two-part protein."""

    box_px: int

    def volume(self, hinge_angle_deg: float, domain_present: bool = True) -> np.ndarray:
        """The ``(D, D, D)`` float32 density of one conformation."""
        ...


@dataclass(frozen=True)
class Blob:
    """One anisotropic Gaussian blob; positions and widths in fractions of the box edge, ``(x, y, z)`` order."""

    center: tuple[float, float, float]
    sigma: tuple[float, float, float]
    rotvec: tuple[float, float, float] = (0.0, 0.0, 0.0)
    amplitude: float = 1.0


# The rigid core: an elongated body with three lobes placed off any common plane, so no mirror maps it onto
# itself. About 60% of the protein's mass.
CORE_BLOBS: tuple[Blob, ...] = (
    Blob(center=(-0.09, 0.00, 0.00), sigma=(0.085, 0.068, 0.06), rotvec=(0.0, 0.0, 0.35)),
    Blob(center=(-0.16, 0.10, 0.06), sigma=(0.045, 0.04, 0.04), amplitude=0.9),
    Blob(center=(-0.05, -0.10, 0.06), sigma=(0.04, 0.032, 0.028), rotvec=(0.5, 0.0, 0.0), amplitude=0.85),
    Blob(center=(-0.19, -0.06, -0.09), sigma=(0.03, 0.03, 0.03), amplitude=0.9),
    Blob(center=(0.02, 0.01, -0.01), sigma=(0.035, 0.03, 0.03), amplitude=0.9),
)

# The flexible domain, attached at HINGE_POINT; at hinge angle 0 it extends along +x. About 35% of the mass.
DOMAIN_BLOBS: tuple[Blob, ...] = (
    Blob(center=(0.13, 0.02, 0.00), sigma=(0.06, 0.052, 0.048), rotvec=(0.0, 0.0, 0.3)),
    Blob(center=(0.21, -0.05, 0.03), sigma=(0.045, 0.04, 0.035), amplitude=0.95),
    Blob(center=(0.18, 0.085, -0.04), sigma=(0.035, 0.035, 0.035), amplitude=0.9),
)

HINGE_POINT: tuple[float, float, float] = (0.055, 0.0, 0.0)
# Mostly along y, so opening the hinge swings the domain out of the core's plane (visible in most views).
HINGE_AXIS: tuple[float, float, float] = (0.1, 1.0, 0.25)


def grid_coordinates(box_px: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Voxel coordinates ``(x, y, z)`` in fractions of the box edge, each ``(D, D, D)`` float32, origin at D // 2."""
    axis = (np.arange(box_px, dtype=np.float32) - box_px // 2) / np.float32(box_px)  # (D,)
    z, y, x = np.meshgrid(axis, axis, axis, indexing="ij")  # each (D, D, D)
    return x, y, z


def hinge_rotation(hinge_angle_deg: float, axis: tuple[float, float, float] = HINGE_AXIS) -> np.ndarray:
    """The ``(3, 3)`` rotation (acting on ``(x, y, z)`` column vectors) of the domain about the hinge axis."""
    unit_axis = np.asarray(axis, dtype=np.float64)
    unit_axis /= np.linalg.norm(unit_axis)
    return Rotation.from_rotvec(np.deg2rad(hinge_angle_deg) * unit_axis).as_matrix()


# Blobs are evaluated out to this many standard deviations (beyond it a Gaussian is below 4e-6 of its peak).
BLOB_EXTENT_SIGMAS = 5.0


def render_blobs(
    blobs: tuple[Blob, ...], box_px: int, rotation: np.ndarray | None = None, pivot: tuple[float, ...] = (0, 0, 0)
) -> np.ndarray:
    """Sum of Gaussian blobs, optionally rigidly rotated about ``pivot``, as a ``(D, D, D)`` float32 volume."""
    rotation = np.eye(3) if rotation is None else np.asarray(rotation, dtype=np.float64)
    pivot_vec = np.asarray(pivot, dtype=np.float64)
    volume = np.zeros((box_px,) * 3, dtype=np.float32)
    axis = (np.arange(box_px, dtype=np.float64) - box_px // 2) / box_px  # (D,) box fractions
    for blob in blobs:
        axes = rotation @ Rotation.from_rotvec(blob.rotvec).as_matrix()  # blob principal axes, columns
        center = pivot_vec + rotation @ (np.asarray(blob.center) - pivot_vec)  # (x, y, z)
        precision = axes @ np.diag(1.0 / np.asarray(blob.sigma) ** 2) @ axes.T  # inverse covariance
        # Only the voxels within BLOB_EXTENT_SIGMAS of the centre are evaluated: most blobs are small.
        reach = BLOB_EXTENT_SIGMAS * max(blob.sigma)
        window = [np.flatnonzero(np.abs(axis - c) <= reach) for c in center]  # x, y, z index ranges
        if any(w.size == 0 for w in window):
            continue
        dx, dy, dz = (
            (axis[w] - c).astype(np.float32).reshape(shape)
            for w, c, shape in zip(window, center, [(1, 1, -1), (1, -1, 1), (-1, 1, 1)], strict=True)
        )
        p = precision.astype(np.float32)
        quadratic = (p[0, 0] * dx * dx + p[1, 1] * dy * dy + p[2, 2] * dz * dz
                     + 2 * (p[0, 1] * dx * dy + p[0, 2] * dx * dz + p[1, 2] * dy * dz))  # (nz, ny, nx)
        region = (slice(window[2][0], window[2][-1] + 1), slice(window[1][0], window[1][-1] + 1),
                  slice(window[0][0], window[0][-1] + 1))
        volume[region] += np.float32(blob.amplitude) * np.exp(np.float32(-0.5) * quadratic)
    return volume


class BlobPhantom:
    """The built-in hinged protein: a rigid core and a domain that rotates about a hinge axis or is absent."""

    def __init__(self, box_px: int) -> None:
        if box_px < 8:
            raise InvalidArgumentError("box_px", f"must be at least 8, got {box_px}")
        self.box_px = int(box_px)
        self._core = render_blobs(CORE_BLOBS, self.box_px)  # (D, D, D) float32

    def core_volume(self) -> np.ndarray:
        """The rigid core alone, ``(D, D, D)`` float32."""
        return self._core.copy()

    def domain_volume(self, hinge_angle_deg: float) -> np.ndarray:
        """The flexible domain alone at a hinge angle, ``(D, D, D)`` float32."""
        return render_blobs(DOMAIN_BLOBS, self.box_px, hinge_rotation(hinge_angle_deg), HINGE_POINT)

    def volume(self, hinge_angle_deg: float, domain_present: bool = True) -> np.ndarray:
        """One conformation, ``(D, D, D)`` float32: core plus the domain at the hinge angle, or the core alone."""
        if not domain_present:
            return self.core_volume()
        return self._core + self.domain_volume(hinge_angle_deg)


class MapPhantom:
    """An input map split into a core and a domain by a soft plane, the domain rotating about a hinge in that plane.

    The cut is perpendicular to the map's longest principal axis, placed so that ``domain_fraction`` of the
    (positive) mass lies beyond it; the hinge axis lies in the cut plane, through the mass centre of the cut's
    neighbourhood, along the map's second principal axis. At hinge angle 0 core plus domain is the input map.
    """

    def __init__(self, volume: np.ndarray, domain_fraction: float = 0.35, edge_px: float = 2.0) -> None:
        volume = np.asarray(volume, dtype=np.float32)
        if volume.ndim != 3 or len(set(volume.shape)) != 1:
            raise InvalidArgumentError("volume", f"must be a cubic 3D map, got shape {volume.shape}")
        if not np.all(np.isfinite(volume)):
            raise InvalidArgumentError("volume", "contains NaN or Inf")
        if not 0.05 <= domain_fraction <= 0.6:
            raise InvalidArgumentError("domain_fraction", f"must be in [0.05, 0.6], got {domain_fraction}")
        self.box_px = int(volume.shape[0])
        mass = np.clip(volume, 0.0, None)
        if mass.sum() <= 0:
            raise InvalidArgumentError("volume", "has no positive density to split into core and domain")
        x, y, z = grid_coordinates(self.box_px)
        points = np.stack([x, y, z], axis=-1).reshape(-1, 3).astype(np.float64)  # (D^3, 3) box fractions
        weights = mass.reshape(-1).astype(np.float64) / mass.sum()
        centroid = weights @ points
        centred = points - centroid
        covariance = (centred * weights[:, None]).T @ centred
        _, eigenvectors = np.linalg.eigh(covariance)  # ascending eigenvalues
        long_axis, second_axis = eigenvectors[:, 2], eigenvectors[:, 1]
        along = centred @ long_axis  # (D^3,) signed distance along the long axis
        order = np.argsort(along)
        cumulative = np.cumsum(weights[order])
        cut = along[order][np.searchsorted(cumulative, 1.0 - domain_fraction)]
        edge = edge_px / self.box_px
        # A raised-cosine ramp across the cut keeps both parts smooth, so neither has a sharp artificial face.
        ramp = np.clip((along - cut) / (2 * edge) + 0.5, 0.0, 1.0)
        domain_weight = (0.5 - 0.5 * np.cos(np.pi * ramp)).reshape(volume.shape).astype(np.float32)
        near_cut = np.abs(along - cut) <= 2 * edge
        plane_weights = weights * near_cut
        if plane_weights.sum() > 0:
            hinge_point = (plane_weights @ points) / plane_weights.sum()
        else:
            hinge_point = centroid + cut * long_axis
        self.hinge_point = tuple(float(v) for v in hinge_point)
        self.hinge_axis = tuple(float(v) for v in second_axis)
        self._core = volume * (1.0 - domain_weight)  # (D, D, D) float32
        self._domain = volume * domain_weight  # (D, D, D) float32

    def core_volume(self) -> np.ndarray:
        """The part of the map on the core side of the cut, ``(D, D, D)`` float32."""
        return self._core.copy()

    def domain_volume(self, hinge_angle_deg: float) -> np.ndarray:
        """The domain part of the map rotated about the hinge, ``(D, D, D)`` float32 (cubic-spline resampling)."""
        if hinge_angle_deg == 0:
            return self._domain.copy()
        rotation = hinge_rotation(hinge_angle_deg, self.hinge_axis)  # acts on (x, y, z)
        # ndimage maps output index -> input index: input = R^T (out - pivot) + pivot, in (z, y, x) index order.
        flip = np.eye(3)[::-1]
        inverse_zyx = flip @ rotation.T @ flip
        pivot_zyx = np.asarray(self.hinge_point[::-1]) * self.box_px + self.box_px // 2
        offset = pivot_zyx - inverse_zyx @ pivot_zyx
        return ndimage.affine_transform(self._domain, inverse_zyx, offset=offset, order=3, mode="constant")

    def volume(self, hinge_angle_deg: float, domain_present: bool = True) -> np.ndarray:
        """One conformation, ``(D, D, D)`` float32: core plus rotated domain, or the core alone."""
        if not domain_present:
            return self.core_volume()
        return self._core + self.domain_volume(hinge_angle_deg)


def particle_radius_px(volume: np.ndarray, mass_fraction: float = 0.99) -> float:
    """Radius (px) of the sphere about the box centre that holds ``mass_fraction`` of the positive density."""
    box_px = volume.shape[0]
    mass = np.clip(np.asarray(volume, dtype=np.float64), 0.0, None).reshape(-1)
    x, y, z = grid_coordinates(box_px)
    radius = (np.sqrt(x * x + y * y + z * z) * box_px).reshape(-1)
    order = np.argsort(radius)
    cumulative = np.cumsum(mass[order])
    return float(radius[order][np.searchsorted(cumulative, mass_fraction * cumulative[-1])])


def resize_volume(volume: np.ndarray, box_px: int) -> np.ndarray:
    """Resample a cubic ``(d, d, d)`` map to ``(D, D, D)`` by Fourier cropping or zero-padding (same physical box)."""
    volume = np.asarray(volume, dtype=np.float32)
    old_box = volume.shape[0]
    if old_box == box_px:
        return volume.copy()
    fft = fft_module(np)
    spectrum = fft.fftshift(fft.fftn(fft.ifftshift(volume), workers=fft_workers()))  # (d, d, d) centred
    resized = np.zeros((box_px,) * 3, dtype=np.complex64)
    keep = min(old_box, box_px)
    src = slice(old_box // 2 - keep // 2, old_box // 2 - keep // 2 + keep)
    dst = slice(box_px // 2 - keep // 2, box_px // 2 - keep // 2 + keep)
    resized[dst, dst, dst] = spectrum[src, src, src]
    # Keep real-space density values (not sums) unchanged: scale by the voxel-count ratio.
    scale = (box_px / old_box) ** 3
    real = fft.fftshift(fft.ifftn(fft.ifftshift(resized), workers=fft_workers())).real * scale
    return real.astype(np.float32)
