"""Parameters of heterogeneous and homogeneous refinement (defaults: SPEC §5.3, cryoSPARC's), with their checks.

Every check raises :class:`cryostack.errors.InvalidArgumentError` naming the parameter as the proto names it
(the servicer prefixes ``parameters.``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cryostack.services.checks import Check, finite_positive, nyquist_check, raise_first


@dataclass(frozen=True)
class HeteroParameters:
    """Every parameter of heterogeneous refinement."""

    batch_size_per_class: int = 1000
    initial_resolution_a: float = 20.0
    random_assignment_iterations: int = 5
    final_full_iterations: int = 2
    convergence_class_change_fraction: float = 0.05
    # Bound on the online-EM iterations when the class changes never fall below the criterion.
    max_online_iterations: int = 50
    # Finest resolution the search may reach (None: Nyquist); the search follows the classes' FSC up to it.
    max_resolution_a: float | None = None

    def check(self, n_particles: int | None = None, pixel_size_a: float | None = None,
              class_count: int | None = None) -> None:
        """Raise :class:`InvalidArgumentError` naming the first out-of-range parameter."""
        checks: list[Check] = [
            ("batch_size_per_class", self.batch_size_per_class >= 1, "must be at least 1"),
            ("initial_resolution_a", finite_positive(self.initial_resolution_a), "must be positive"),
            ("random_assignment_iterations", self.random_assignment_iterations >= 0, "must be non-negative"),
            ("final_full_iterations", self.final_full_iterations >= 1, "must be at least 1"),
            ("convergence_class_change_fraction", 0 < self.convergence_class_change_fraction < 1,
             f"must lie in (0, 1), got {self.convergence_class_change_fraction:g}"),
            ("max_online_iterations", self.max_online_iterations >= self.random_assignment_iterations,
             "must be at least random_assignment_iterations"),
            ("max_resolution_a", self.max_resolution_a is None or finite_positive(self.max_resolution_a),
             "must be positive"),
        ]
        checks += nyquist_check("initial_resolution_a", self.initial_resolution_a, pixel_size_a)
        if self.max_resolution_a is not None:
            checks += nyquist_check("max_resolution_a", self.max_resolution_a, pixel_size_a)
        if class_count is not None:
            checks.append(("volume_uris", class_count >= 1, "at least one volume is required"))
            if n_particles is not None:
                checks.append(("volume_uris", class_count <= n_particles,
                               f"{class_count} classes for {n_particles} particles"))
        raise_first(checks)


@dataclass(frozen=True)
class HomoParameters:
    """Every parameter of homogeneous (gold-standard) refinement."""

    initial_lowpass_resolution_a: float = 30.0
    mask_threshold_fraction: float = 0.2
    mask_dilation_a: float = 3.0
    mask_soft_edge_width_a: float = 3.0
    max_iterations: int | None = None
    # Iterations of global search before the local searches (the first always is global).
    global_iterations: int = 2
    # Finest resolution the search may reach (None: Nyquist).
    max_resolution_a: float | None = None

    def check(self, n_particles: int | None = None, pixel_size_a: float | None = None) -> None:
        """Raise :class:`InvalidArgumentError` naming the first out-of-range parameter."""
        checks: list[Check] = [
            ("initial_lowpass_resolution_a", finite_positive(self.initial_lowpass_resolution_a), "must be positive"),
            ("mask_threshold_fraction", 0 < self.mask_threshold_fraction < 1,
             f"must lie in (0, 1), got {self.mask_threshold_fraction:g}"),
            ("mask_dilation_a", math.isfinite(self.mask_dilation_a) and self.mask_dilation_a >= 0,
             "must be non-negative"),
            ("mask_soft_edge_width_a", math.isfinite(self.mask_soft_edge_width_a) and self.mask_soft_edge_width_a >= 0,
             "must be non-negative"),
            ("max_iterations", self.max_iterations is None or self.max_iterations >= 1, "must be at least 1"),
            ("global_iterations", self.global_iterations >= 1, "must be at least 1"),
            ("max_resolution_a", self.max_resolution_a is None or finite_positive(self.max_resolution_a),
             "must be positive"),
        ]
        checks += nyquist_check("initial_lowpass_resolution_a", self.initial_lowpass_resolution_a, pixel_size_a)
        if self.max_resolution_a is not None:
            checks += nyquist_check("max_resolution_a", self.max_resolution_a, pixel_size_a)
        if n_particles is not None:
            checks.append(("particles_uri", n_particles >= 2, "gold-standard refinement needs at least 2 particles"))
        raise_first(checks)
