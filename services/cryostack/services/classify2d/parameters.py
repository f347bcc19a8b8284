"""Parameters of 2D classification, with cryoSPARC's defaults, and their validation against a particle set."""

from __future__ import annotations

import math
from dataclasses import dataclass

from cryostack.core.fourier import nyquist_resolution_a
from cryostack.errors import InvalidArgumentError

# Maximum resolution (Å) when none is given (cryoSPARC's default), unless Nyquist is coarser.
DEFAULT_MAX_RESOLUTION_A = 6.0


@dataclass(frozen=True)
class Classify2DParameters:
    """Algorithm parameters with cryoSPARC's defaults (SPEC §5.1); the cap is off unless one of its fields is set."""

    class_count: int = 50
    max_resolution_a: float | None = None  # None: 6 Å, or Nyquist when that is coarser
    initial_uncertainty_factor: float = 2.0
    online_em_iterations: int = 20
    batch_size_per_class: int = 100
    final_full_iterations: int = 1
    sigma_annealing_start_iteration: int = 2
    sigma_annealing_iterations: int = 15
    force_max_over_poses_shifts: bool = True
    circular_mask_inner_diameter_a: float | None = None  # None: 0.85 × box width
    circular_mask_outer_diameter_a: float | None = None  # None: 0.99 × box width
    recenter_classes: bool = True
    zero_pad_factor: int = 2
    max_particles_per_class_count: int | None = None
    max_particles_per_class_mean_multiple: float | None = None
    min_particles_per_class: float | None = None  # None: no re-seeding (cryoSPARC's behaviour)

    def resolution_limit_a(self, pixel_size_a: float) -> float:
        """The maximum resolution (Å) in force: the one asked for, else 6 Å unless Nyquist is coarser."""
        if self.max_resolution_a is not None:
            return float(self.max_resolution_a)
        return max(DEFAULT_MAX_RESOLUTION_A, nyquist_resolution_a(pixel_size_a))

    @property
    def total_iterations(self) -> int:
        """Online plus full iterations."""
        return self.online_em_iterations + self.final_full_iterations

    def mask_diameters_a(self, box_px: int, pixel_size_a: float) -> tuple[float, float]:
        """Inner and outer diameter (Å) of the soft circular mask, defaults filled in."""
        width_a = box_px * pixel_size_a
        inner = self.circular_mask_inner_diameter_a
        outer = self.circular_mask_outer_diameter_a
        return (0.85 * width_a if inner is None else inner, 0.99 * width_a if outer is None else outer)

    def capacity(self, n_particles: int) -> int | None:
        """The absolute per-class cap for ``n_particles`` particles, or None without a cap."""
        if self.max_particles_per_class_count is not None:
            return int(self.max_particles_per_class_count)
        if self.max_particles_per_class_mean_multiple is not None:
            return math.ceil(self.max_particles_per_class_mean_multiple * n_particles / self.class_count - 1e-9)
        return None

    def reseed_threshold(self) -> float | None:
        """Expected occupancy below which a class is re-seeded, or None when re-seeding is off."""
        return None if self.min_particles_per_class is None else float(self.min_particles_per_class)


def validate_parameters(params: Classify2DParameters, n_particles: int, box_px: int, pixel_size_a: float) -> None:
    """Raise InvalidArgumentError naming the first parameter that cannot work for this particle set."""

    def fail(name: str, reason: str) -> None:
        raise InvalidArgumentError(f"parameters.{name}", reason)

    k = params.class_count
    if k < 1:
        fail("class_count", f"must be at least 1, got {k}")
    if k > n_particles:
        fail("class_count", f"{k} classes for only {n_particles} particles")
    nyquist_a = nyquist_resolution_a(pixel_size_a)
    limit_a = params.resolution_limit_a(pixel_size_a)
    if not (math.isfinite(limit_a) and limit_a >= nyquist_a * (1 - 1e-9)):
        fail("max_resolution_a", f"{limit_a} Å is finer than Nyquist ({nyquist_a:g} Å at "
                                 f"{pixel_size_a:g} Å/px)")
    if not params.initial_uncertainty_factor >= 1:
        fail("initial_uncertainty_factor", f"must be at least 1, got {params.initial_uncertainty_factor}")
    if params.online_em_iterations < 0:
        fail("online_em_iterations", "must not be negative")
    if params.batch_size_per_class < 1:
        fail("batch_size_per_class", f"must be at least 1, got {params.batch_size_per_class}")
    if params.final_full_iterations < 1:
        fail("final_full_iterations", "must be at least 1: the last full pass assigns every particle")
    if params.sigma_annealing_start_iteration < 1:
        fail("sigma_annealing_start_iteration", "iterations count from 1")
    if params.sigma_annealing_iterations < 0:
        fail("sigma_annealing_iterations", "must not be negative")
    if params.zero_pad_factor < 1 or (params.zero_pad_factor * box_px) % 2:
        fail("zero_pad_factor", f"must be at least 1 and make an even padded box, got {params.zero_pad_factor}")
    width_a = box_px * pixel_size_a
    inner, outer = params.mask_diameters_a(box_px, pixel_size_a)
    if not inner > 0:
        fail("circular_mask_inner_diameter_a", f"must be positive, got {inner}")
    if outer > width_a * (1 + 1e-9):
        fail("circular_mask_outer_diameter_a", f"{outer} Å is larger than the box ({width_a:g} Å)")
    if not inner < outer:
        fail("circular_mask_inner_diameter_a", f"{inner} Å must be smaller than the outer diameter {outer} Å")
    count, multiple = params.max_particles_per_class_count, params.max_particles_per_class_mean_multiple
    if count is not None and count < 1:
        fail("max_particles_per_class_count", f"must be at least 1, got {count}")
    if multiple is not None and not multiple >= 1:
        fail("max_particles_per_class_mean_multiple", f"must be at least 1, got {multiple}")
    cap = params.capacity(n_particles)
    if cap is not None and cap * k < n_particles:
        name = "max_particles_per_class_count" if count is not None else "max_particles_per_class_mean_multiple"
        fail(name, f"{k} classes × {cap} particles cannot hold the {n_particles} particles")
    minimum = params.min_particles_per_class
    if minimum is not None:
        if minimum < 0:
            fail("min_particles_per_class", "must not be negative")
        if minimum * k > n_particles:
            fail("min_particles_per_class", f"{k} classes × {minimum:g} exceeds the {n_particles} particles")
        if cap is not None and minimum > cap:
            fail("min_particles_per_class", f"{minimum:g} exceeds the cap of {cap}")
