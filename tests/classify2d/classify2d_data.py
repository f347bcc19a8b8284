"""Synthetic 2D particle sets with ground truth for the classification tests.

Each particle is ``CTF · shift_s(rotate_ψ(reference_c)) + white noise`` with the conventions of the classifier:
``rotate_ψ`` reads the reference's transform at ``Aᵀk`` for ``A = rotation_matrix_2d(ψ)`` and the shift moves the
content by ``+s`` pixels. References are sums of Gaussian blobs, re-centred so the centre of mass of each is
at the origin pixel (a re-centred class average then has the same origin as its reference).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cryostack.core.ctf import CtfParameters, ctf_2d
from cryostack.core.fourier import fft2_centered, ifft2_centered, phase_shift_2d
from cryostack.core.geometry import rotation_matrix_2d
from cryostack.core.projection import Projector2D

PIXEL_SIZE_A = 4.0


@dataclass(frozen=True)
class SyntheticSet:
    """Particle images and the truth behind them."""

    images: np.ndarray  # (N, D, D) float32
    references: np.ndarray  # (C, D, D) float32 noise-free, CTF-free, centred
    labels: np.ndarray  # (N,) int64 reference of each particle
    psi_deg: np.ndarray  # (N,) float64
    shift_px: np.ndarray  # (N, 2) float64 (sx, sy)
    ctf: CtfParameters | None


def blob_image(box_px: int, blobs: list[tuple[float, float, float, float]]) -> np.ndarray:
    """Sum of Gaussian blobs (x_px, y_px, sigma_px, amplitude) around the origin, moved so its centre of mass is 0."""
    coords = np.arange(box_px) - box_px // 2
    y, x = np.meshgrid(coords, coords, indexing="ij")
    image = np.zeros((box_px, box_px))
    for bx, by, sigma, amplitude in blobs:
        image += amplitude * np.exp(-((x - bx) ** 2 + (y - by) ** 2) / (2 * sigma**2))
    mass = image.sum()
    centre = np.array([(image * x).sum() / mass, (image * y).sum() / mass])
    return ifft2_centered(phase_shift_2d(fft2_centered(image), -centre)).real.astype(np.float32)


def two_references(box_px: int) -> np.ndarray:
    """Two clearly different, asymmetric shapes: (2, D, D) float32."""
    scale = box_px / 32
    first = blob_image(box_px, [(-5 * scale, 0, 2.5 * scale, 1.0), (4 * scale, 0, 2.0 * scale, 0.8),
                                (4 * scale, 6 * scale, 1.8 * scale, 0.7)])
    second = blob_image(box_px, [(0, -6 * scale, 2.0 * scale, 0.9), (0, 2 * scale, 3.5 * scale, 1.0),
                                 (-6 * scale, 5 * scale, 1.5 * scale, 0.6)])
    return np.stack([first, second])


def make_set(
    references: np.ndarray,
    n_particles: int,
    *,
    seed: int,
    snr: float,
    with_ctf: bool,
    proportions: np.ndarray | None = None,
    max_shift_px: float = 2.0,
    defocus_range_a: tuple[float, float] = (8_000.0, 20_000.0),
) -> SyntheticSet:
    """Draw labels, angles, shifts (uniform in a disc) and defocus; render, apply the CTF and add noise."""
    rng = np.random.default_rng(seed)
    n_refs, box = references.shape[0], references.shape[-1]
    labels = rng.choice(n_refs, size=n_particles, p=proportions).astype(np.int64)
    psi = rng.uniform(0.0, 360.0, n_particles)
    radius = max_shift_px * np.sqrt(rng.uniform(0, 1, n_particles))
    direction = rng.uniform(0, 2 * np.pi, n_particles)
    shifts = np.stack([radius * np.cos(direction), radius * np.sin(direction)], axis=1)
    clean_ft = np.empty((n_particles, box, box), dtype=np.complex64)
    for c in range(n_refs):
        members = np.flatnonzero(labels == c)
        clean_ft[members] = Projector2D(references[c]).rotate(rotation_matrix_2d(psi[members]))[0]
    clean_ft = phase_shift_2d(clean_ft, shifts)
    ctf = None
    if with_ctf:
        defocus = rng.uniform(*defocus_range_a, n_particles)
        ctf = CtfParameters(
            defocus_u_a=defocus + 100.0, defocus_v_a=defocus - 100.0,
            defocus_angle_deg=rng.uniform(0, 180, n_particles),
            voltage_kv=np.full(n_particles, 300.0), cs_mm=np.full(n_particles, 2.7),
            amplitude_contrast=np.full(n_particles, 0.1), phase_shift_deg=np.zeros(n_particles),
            bfactor_a2=np.zeros(n_particles),
        )
        clean_ft = clean_ft * ctf_2d(box, PIXEL_SIZE_A, ctf.defocus_u_a, ctf.defocus_v_a, ctf.defocus_angle_deg,
                                     300.0, 2.7, 0.1)
    clean = ifft2_centered(clean_ft).real
    sigma = np.sqrt(clean.var(axis=(1, 2)).mean() / snr)
    images = clean + sigma * rng.standard_normal(clean.shape)
    return SyntheticSet(images.astype(np.float32), references, labels, psi, shifts, ctf)
