"""What an ab-initio run carries between iterations (its checkpoint), reports per iteration and returns."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np

from cryostack.core.backend import to_host
from cryostack.core.geometry import matrix_to_euler_deg, shift_px_to_relion_origin
from cryostack.core.numerics import floored_log_prior

# The floor of a class prior as a fraction of uniform, so that no class's prior can fall to zero and keep it empty.
MIN_PRIOR_FRACTION = 0.05


@dataclass
class AbinitioState:
    """Everything a run carries from one iteration to the next (what a checkpoint stores)."""

    iteration: int  # iterations completed
    data: Any  # (K, 2, P, P, P) complex64 running Σ w·CTF·X/σ² per class and half-set, per particle (run's device)
    weight: Any  # (K, 2, P, P, P) float32 running Σ w·CTF²/σ², per particle (run's device)
    noise_sum: np.ndarray  # (n_shells,) float64 running Σ residual power (per coefficient) over images
    noise_weight: np.ndarray  # (n_shells,) float64 running image count behind ``noise_sum``
    class_mass: np.ndarray  # (K,) float64 running class occupancy
    fsc: np.ndarray  # (K, n_shells) float64 FSC of the running half-set maps, refreshed every few iterations

    @property
    def noise_power(self) -> np.ndarray:
        """σ² per shell of the working box: (n_shells,) float64."""
        return self.noise_sum / self.noise_weight

    @property
    def log_prior(self) -> np.ndarray:
        """Class log-priors from the running occupancy, each at least a fraction of uniform: (K,)."""
        return floored_log_prior(self.class_mass, MIN_PRIOR_FRACTION)

    def to_bytes(self) -> bytes:
        """Serialise as ``.npz`` (no pickle)."""
        buffer = io.BytesIO()
        np.savez(buffer, iteration=np.int64(self.iteration), data=to_host(self.data), weight=to_host(self.weight),
                 noise_sum=self.noise_sum, noise_weight=self.noise_weight, class_mass=self.class_mass, fsc=self.fsc)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, payload: bytes) -> AbinitioState:
        """Read back what :meth:`to_bytes` wrote (in host memory; a run moves it to its device)."""
        with np.load(io.BytesIO(payload), allow_pickle=False) as z:
            return cls(iteration=int(z["iteration"]), data=z["data"], weight=z["weight"], noise_sum=z["noise_sum"],
                       noise_weight=z["noise_weight"], class_mass=z["class_mass"], fsc=z["fsc"])


@dataclass(frozen=True)
class IterationReport:
    """What one iteration did, for progress reports."""

    iteration: int  # counted from 1
    total_iterations: int
    resolution_a: float
    minibatch_size: int
    learning_rate: float
    class_similarity: float
    so3_level: int
    class_fractions: np.ndarray  # (K,) running class occupancy
    objective: float  # mean log-evidence per particle of the minibatch, per scored coefficient
    half_map_resolution_a: np.ndarray  # (K,) FSC-0.143 resolution of the running half-set maps


@dataclass(frozen=True)
class AbinitioResult:
    """The outcome of a run: volumes on the particles' box and per-particle assignments."""

    volumes: np.ndarray  # (K, D, D, D) float32, Wiener-filtered, on the grey scale of the data
    class_posteriors: np.ndarray  # (N, K) float32
    rotations: np.ndarray  # (N, 3, 3) float64 best pose (RELION matrix) within the best class
    shift_px: np.ndarray  # (N, 2) float32 best image shift (x, y): the particle is its projection moved by it
    half_map_fsc: np.ndarray  # (K, D_w // 2 + 1) float64 FSC of each class's half-set maps
    resolution_a: np.ndarray  # (K,) FSC-0.143 resolution of each class's half-set maps
    final_resolution_a: float  # the resolution the frequency marching ended at
    pixel_size_a: float

    @property
    def best_class(self) -> np.ndarray:
        """Most probable class of every particle, 0-based: (N,) int64."""
        return np.argmax(self.class_posteriors, axis=1)

    @property
    def class_sizes(self) -> np.ndarray:
        """Particles per class by most probable class: (K,) int64."""
        return np.bincount(self.best_class, minlength=self.class_posteriors.shape[1])

    @property
    def euler_deg(self) -> np.ndarray:
        """RELION ``(rot, tilt, psi)`` in degrees of the best poses: (N, 3) float64."""
        return matrix_to_euler_deg(self.rotations)

    @property
    def origin_xy_a(self) -> np.ndarray:
        """RELION 3.1 ``rlnOriginXAngst/YAngst`` of the best shifts: (N, 2) float64."""
        return shift_px_to_relion_origin(self.shift_px, self.pixel_size_a)
