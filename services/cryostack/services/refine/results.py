"""What a refinement run reports per iteration and returns at the end (host arrays, on the particles' box D)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cryostack.core.geometry import matrix_to_euler_deg, shift_px_to_relion_origin


@dataclass(frozen=True)
class RefineIterationReport:
    """What one refinement iteration did, for progress reports."""

    iteration: int  # counted from 1
    phase: str  # "random", "online", "full" (heterogeneous); "global", "local" (homogeneous)
    resolution_a: float  # resolution the search scored to
    particles_scored: int
    class_fractions: np.ndarray  # (K,) share of the scored particles per class (homogeneous: (1,) = 1)
    class_change_fraction: float  # share of scored particles whose class changed (NaN when none had one before)
    half_map_resolution_a: np.ndarray  # (K,) FSC-0.143 resolution of each class's half maps after the iteration


@dataclass(frozen=True)
class _PerParticle:
    rotations: np.ndarray  # (N, 3, 3) float64 best pose (RELION matrix)
    shift_px: np.ndarray  # (N, 2) float32 best image shift (x, y): the particle is its projection moved by it
    half_set: np.ndarray  # (N,) int64 half-set 0 or 1 (rlnRandomSubset 1 or 2)
    pixel_size_a: float

    @property
    def euler_deg(self) -> np.ndarray:
        """RELION ``(rot, tilt, psi)`` in degrees of the best poses: (N, 3) float64."""
        return matrix_to_euler_deg(self.rotations)

    @property
    def origin_xy_a(self) -> np.ndarray:
        """RELION 3.1 ``rlnOriginXAngst/YAngst`` of the best shifts: (N, 2) float64."""
        return shift_px_to_relion_origin(self.shift_px, self.pixel_size_a)


@dataclass(frozen=True)
class HeteroResult(_PerParticle):
    """The outcome of a heterogeneous refinement."""

    volumes: np.ndarray  # (K, D, D, D) float32, both half-sets, Wiener-filtered with the full-data FSC
    half_maps: np.ndarray  # (K, 2, D, D, D) float32, unfiltered (plainly regularised) half maps
    class_posteriors: np.ndarray  # (N, K) float32
    fsc: np.ndarray  # (K, D // 2 + 1) float64 half-map FSC of each class (on the particles' box)
    resolution_a: np.ndarray  # (K,) FSC-0.143 resolution; NaN where a class has too few particles for two halves
    iteration_count: int
    final_class_change_fraction: float

    @property
    def best_class(self) -> np.ndarray:
        """Most probable class of every particle, 0-based: (N,) int64."""
        return np.argmax(self.class_posteriors, axis=1)

    @property
    def class_sizes(self) -> np.ndarray:
        """Particles per class by most probable class: (K,) int64."""
        return np.bincount(self.best_class, minlength=self.class_posteriors.shape[1])


@dataclass(frozen=True)
class HomoResult(_PerParticle):
    """The outcome of a homogeneous (gold-standard) refinement."""

    map: np.ndarray  # (D, D, D) float32, both half-sets, Wiener-filtered with the full-data FSC
    half_maps: np.ndarray  # (2, D, D, D) float32, unfiltered half maps
    mask: np.ndarray  # (D, D, D) float32 in [0, 1], the automatic soft mask of the final map
    fsc_unmasked: np.ndarray  # (D // 2 + 1,) float64
    fsc_masked: np.ndarray  # (D // 2 + 1,) float64
    fsc_corrected: np.ndarray  # (D // 2 + 1,) float64 masked FSC corrected by phase randomisation
    resolution_a: float  # FSC-0.143 resolution of the corrected masked FSC (the GSFSC resolution)
    unmasked_resolution_a: float
    iteration_count: int
    resolution_history_a: np.ndarray  # (iterations,) GSFSC resolution after each iteration
