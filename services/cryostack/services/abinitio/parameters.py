"""The parameters of ab-initio reconstruction (SPEC §5.2, cryoSPARC's defaults) and their checks."""

from __future__ import annotations

import math
from dataclasses import dataclass

from cryostack.services.checks import finite_positive, nyquist_check, raise_first


@dataclass(frozen=True)
class AbinitioParameters:
    """Every parameter of ab-initio reconstruction (defaults from SPEC §5.2 / cryoSPARC)."""

    class_count: int = 1
    minibatch_size_initial: int = 90
    minibatch_size_final: int = 300
    initial_resolution_a: float = 35.0
    max_resolution_a: float = 12.0
    learning_rate_initial: float = 0.4
    class_similarity_initial: float = 0.1
    class_similarity_final: float = 0.0
    initial_iterations: int = 200
    final_iterations: int = 300
    max_shift_px: float | None = None  # radius of the global translational search; None: 10% of the box

    @property
    def total_iterations(self) -> int:
        """Number of minibatch iterations of a run."""
        return self.initial_iterations + self.final_iterations

    def check(self, n_particles: int | None = None, pixel_size_a: float | None = None) -> None:
        """Raise :class:`InvalidArgumentError` naming the first out-of-range parameter."""
        checks: list[tuple[str, bool, str]] = [
            ("class_count", self.class_count >= 1, f"must be at least 1, got {self.class_count}"),
            ("minibatch_size_initial", self.minibatch_size_initial >= 1, "must be at least 1"),
            (
                "minibatch_size_final",
                self.minibatch_size_final >= self.minibatch_size_initial,
                f"{self.minibatch_size_final} is below minibatch_size_initial {self.minibatch_size_initial}",
            ),
            ("initial_resolution_a", finite_positive(self.initial_resolution_a), "must be positive"),
            ("max_resolution_a", finite_positive(self.max_resolution_a), "must be positive"),
            (
                "initial_resolution_a",
                self.initial_resolution_a >= self.max_resolution_a,
                f"{self.initial_resolution_a:g} Å is finer than max_resolution_a {self.max_resolution_a:g} Å",
            ),
            (
                "learning_rate_initial",
                finite_positive(self.learning_rate_initial) and self.learning_rate_initial <= 1,
                f"must lie in (0, 1], got {self.learning_rate_initial:g}",
            ),
            ("class_similarity_initial", 0 <= self.class_similarity_initial <= 1, "must lie in [0, 1]"),
            (
                "class_similarity_final",
                0 <= self.class_similarity_final <= self.class_similarity_initial,
                "must lie in [0, class_similarity_initial]",
            ),
            ("initial_iterations", self.initial_iterations >= 0, "must be non-negative"),
            ("final_iterations", self.final_iterations >= 0, "must be non-negative"),
            ("final_iterations", self.total_iterations >= 1, "initial + final iterations must be at least 1"),
            (
                "max_shift_px",
                self.max_shift_px is None or (math.isfinite(self.max_shift_px) and self.max_shift_px >= 0),
                "must be non-negative",
            ),
        ]
        checks += nyquist_check("max_resolution_a", self.max_resolution_a, pixel_size_a)
        if n_particles is not None:
            checks.append((
                "class_count",
                self.class_count <= n_particles,
                f"{self.class_count} classes for {n_particles} particles",
            ))
        raise_first(checks)
