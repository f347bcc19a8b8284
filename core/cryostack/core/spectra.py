"""The Fourier coefficients a 3D stage keeps of each particle: one half-plane, sorted by frequency.

Every 3D stage (ab-initio, refinement, variability) works on the same list: the centred transform's coefficients
with ``0 < |k| <= r_max + taper`` on one half-plane (``ky > 0``, or ``ky = 0, kx > 0``; the other half is their
Friedel mates), sorted by ``|k|`` so that every resolution limit is a prefix of the list. Volumes live on a
Fourier-cropped working box ``D_w`` just large enough to hold the kept frequencies; integer frequencies are the
same in both boxes (:mod:`cryostack.core.fourier`).

A :class:`ParticleBatch` is a batch of particles' kept coefficients on the device a run computes on, with their
CTF parameters and half-set labels; :func:`collect_spectra` keeps them for a whole set in memory (ab-initio's
random minibatches), :func:`transform_batch` makes one batch from images streamed from the store (refinement).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from cryostack.core.backend import array_module, to_host
from cryostack.core.ctf import CtfParameters
from cryostack.core.fourier import centered_coefficients_2d, resolution_to_shell
from cryostack.errors import InvalidArgumentError

# Coefficients kept beyond the maximum resolution (in shells), so the final maps end in a taper, not a cliff.
TAPER_SHELLS = 2.0


@dataclass(frozen=True)
class SpectralLayout:
    """The half-plane Fourier coefficients kept per particle, sorted by frequency (every limit is a prefix)."""

    box_px: int  # D, the particles' box
    pixel_size_a: float
    ky: np.ndarray  # (C,) int64 centred integer frequencies
    kx: np.ndarray  # (C,) int64
    radius: np.ndarray  # (C,) float64 |k| in shells
    shell: np.ndarray  # (C,) int64 round(|k|)
    working_box_px: int  # D_w: the Fourier-cropped box the volumes live on

    @classmethod
    def for_resolution(cls, box_px: int, pixel_size_a: float, max_resolution_a: float) -> SpectralLayout:
        """Coefficients with ``0 < |k| <= r_max + taper`` on one half-plane (``ky > 0``, or ``ky = 0, kx > 0``)."""
        limit = min(resolution_to_shell(box_px, pixel_size_a, max_resolution_a) + TAPER_SHELLS, box_px // 2)
        k = np.arange(box_px) - box_px // 2
        ky, kx = (a.ravel() for a in np.meshgrid(k, k, indexing="ij"))
        radius = np.hypot(ky, kx)
        keep = ((ky > 0) | ((ky == 0) & (kx > 0))) & (radius <= limit + 1e-9)
        order = np.argsort(radius[keep], kind="stable")
        ky, kx, radius = ky[keep][order], kx[keep][order], radius[keep][order]
        working = min(box_px, 2 * int(np.ceil(limit)) + 4)
        if working < box_px:
            working += working % 2
        return cls(box_px, float(pixel_size_a), ky, kx, radius, np.rint(radius).astype(np.int64), working)

    @property
    def n_coefficients(self) -> int:
        """Number of coefficients C kept per particle."""
        return int(self.ky.shape[0])

    @property
    def n_shells(self) -> int:
        """Shells 0 .. D_w // 2 of the working box."""
        return self.working_box_px // 2 + 1

    @property
    def working_pixel_size_a(self) -> float:
        """Voxel size of the working box, in Å."""
        return self.box_px * self.pixel_size_a / self.working_box_px

    def count_within(self, resolution_a: float) -> int:
        """How many leading coefficients lie inside ``resolution_a``."""
        r = resolution_to_shell(self.box_px, self.pixel_size_a, resolution_a)
        return int(np.searchsorted(self.radius, r + 1e-9, side="right"))

    def flat_indices(self, box_px: int) -> np.ndarray:
        """Flat indices (C,) of the coefficients in a centred ``box_px``² grid."""
        half = box_px // 2
        return (self.ky + half) * box_px + (self.kx + half)

    def frequencies_inv_a(self) -> tuple[np.ndarray, np.ndarray]:
        """Spatial frequencies (fy, fx) in 1/Å of the coefficients: two (C,) float64."""
        scale = 1.0 / (self.box_px * self.pixel_size_a)
        return self.ky * scale, self.kx * scale

    def shell_sum(self, values: np.ndarray) -> np.ndarray:
        """Sum of per-coefficient values (C',) of the first C' coefficients over each shell: (n_shells,)."""
        c = values.shape[-1]
        return np.bincount(self.shell[:c], weights=values, minlength=self.n_shells)[: self.n_shells]

    def shell_count(self, count: int) -> np.ndarray:
        """How many of the first ``count`` coefficients fall in each shell: (n_shells,) int64."""
        return np.bincount(self.shell[:count], minlength=self.n_shells)[: self.n_shells]


@dataclass
class ParticleSpectra:
    """Every particle's kept Fourier coefficients and CTF parameters, in memory for random minibatch access.

    The coefficients live on the device a run computes on (numpy: host memory, cupy: the GPU); a run takes its
    array module from them.
    """

    layout: SpectralLayout
    coefficients: Any  # (N, C) complex64 (numpy or cupy), centred transforms at the layout's coefficients
    ctf: CtfParameters
    power: np.ndarray  # (n_shells,) float64 mean |X|² per coefficient and shell (signal plus noise)

    @property
    def n_particles(self) -> int:
        """Number of particles N."""
        return int(self.coefficients.shape[0])

    def batch(self, rows: np.ndarray, half_set: np.ndarray) -> ParticleBatch:
        """The particles at ``rows`` (n,) as a batch, with the set's half-set labels ``half_set`` (N,)."""
        xp = array_module(self.coefficients)
        return ParticleBatch(coefficients=self.coefficients[xp.asarray(rows)], ctf=self.ctf.take(rows),
                             half_set=np.asarray(half_set)[rows])


def collect_spectra(
    batches: Iterable[tuple[np.ndarray, np.ndarray]],
    n_particles: int,
    ctf: CtfParameters,
    layout: SpectralLayout,
    xp: ModuleType = np,
) -> ParticleSpectra:
    """Transform image batches ``(rows (B,), images (B, D, D))`` once and keep the layout's coefficients.

    The coefficients are kept in array module ``xp`` (numpy, or cupy to run on the GPU); images may be host arrays.
    """
    flat = layout.flat_indices(layout.box_px)
    coefficients = xp.zeros((n_particles, layout.n_coefficients), dtype=np.complex64)
    power_sum = xp.zeros(layout.n_coefficients)  # (C,) float64 Σ |X|² over particles, summed batch by batch
    seen = np.zeros(n_particles, dtype=bool)
    for rows, images in batches:
        kept = centered_coefficients_2d(xp.asarray(images), flat)  # (B, C) complex64
        coefficients[xp.asarray(rows)] = kept
        power_sum += (kept.real**2 + kept.imag**2).sum(axis=0, dtype=np.float64)
        seen[rows] = True
    if not seen.all():
        raise InvalidArgumentError("particles", f"{int((~seen).sum())} of {n_particles} particles were never read")
    mean_power = to_host(power_sum) / n_particles  # (C,)
    counts = layout.shell_count(layout.n_coefficients)
    power = fill_empty_shells(np.where(counts > 0, layout.shell_sum(mean_power) / np.maximum(counts, 1), 0.0))
    return ParticleSpectra(layout=layout, coefficients=coefficients, ctf=ctf, power=power)


@dataclass(frozen=True)
class ParticleBatch:
    """A batch of particles' kept coefficients on the run's device, with their CTF and half-set labels."""

    coefficients: Any  # (n, C) complex64 (numpy or cupy): centred transforms at the layout's coefficients
    ctf: CtfParameters  # n particles
    half_set: np.ndarray  # (n,) int64, 0 or 1

    @property
    def n_particles(self) -> int:
        """Number of particles n in the batch."""
        return int(self.coefficients.shape[0])


def transform_batch(images: Any, layout: SpectralLayout, ctf: CtfParameters, half_set: np.ndarray,
                    xp: ModuleType = np) -> ParticleBatch:
    """The layout's coefficients of images (n, D, D) (host or device) as a batch on the device of ``xp``."""
    kept = centered_coefficients_2d(xp.asarray(images), layout.flat_indices(layout.box_px))  # (n, C)
    return ParticleBatch(coefficients=kept, ctf=ctf, half_set=np.asarray(half_set, dtype=np.int64))


def fill_empty_shells(power: np.ndarray) -> np.ndarray:
    """Replace non-positive shell powers (shells without kept coefficients) by the nearest filled shell's."""
    out = power.copy()
    filled = np.flatnonzero(out > 0)
    if filled.size == 0:
        return np.ones_like(out)
    for i in np.flatnonzero(out <= 0):
        out[i] = out[filled[np.argmin(np.abs(filled - i))]]
    return out
