"""What 2D classification carries between iterations (saved to resume exactly), reports after each, and returns."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class FinalAssignment:
    """Every particle's class, pose and probability after the last full iteration."""

    labels: np.ndarray  # (N,) int64 class index 0..K-1
    psi_deg: np.ndarray  # (N,) float64 in-plane angle (rlnAnglePsi)
    shift_px: np.ndarray  # (N, 2) float64 image shift (sx, sy): particle = template translated by +s
    probability: np.ndarray  # (N,) float64 responsibility of the assigned class


@dataclass
class ClassificationState:
    """Everything an iteration needs from the ones before it; saved after each iteration to resume exactly."""

    iteration: int  # iterations completed
    averages: np.ndarray  # (K, D, D) float32 class averages the next E-step scores against
    sums_data: np.ndarray  # (2, K, P, P) complex64 running half-set sums Σ r·CTF·X (padded grid)
    sums_weight: np.ndarray  # (2, K, P, P) float32 running half-set sums Σ r·CTF²
    occupancy: np.ndarray  # (K,) float64 expected particles per class, scaled to the whole set
    noise_power: np.ndarray  # (D // 2 + 1,) float64 estimated σ²(ν)
    frc: np.ndarray  # (K, D // 2 + 1) float64 FRC of each class's half-set averages
    resolution_a: float  # current resolution (median class FRC at 0.143)
    particles_seen: int
    reseeded: int
    final: FinalAssignment | None = None

    def to_bytes(self) -> bytes:
        """Serialise (numpy .npz, no pickle)."""
        arrays: dict[str, Any] = {
            "iteration": np.int64(self.iteration),
            "averages": self.averages,
            "sums_data": self.sums_data,
            "sums_weight": self.sums_weight,
            "occupancy": self.occupancy,
            "noise_power": self.noise_power,
            "frc": self.frc,
            "resolution_a": np.float64(self.resolution_a),
            "particles_seen": np.int64(self.particles_seen),
            "reseeded": np.int64(self.reseeded),
        }
        if self.final is not None:
            arrays.update({f"final_{name}": getattr(self.final, name) for name in FinalAssignment.__dataclass_fields__})
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, payload: bytes) -> ClassificationState:
        """Inverse of :meth:`to_bytes`."""
        with np.load(io.BytesIO(payload), allow_pickle=False) as data:
            final = None
            if "final_labels" in data:
                names = FinalAssignment.__dataclass_fields__
                final = FinalAssignment(**{name: data[f"final_{name}"] for name in names})
            return cls(
                iteration=int(data["iteration"]),
                averages=data["averages"],
                sums_data=data["sums_data"],
                sums_weight=data["sums_weight"],
                occupancy=data["occupancy"],
                noise_power=data["noise_power"],
                frc=data["frc"],
                resolution_a=float(data["resolution_a"]),
                particles_seen=int(data["particles_seen"]),
                reseeded=int(data["reseeded"]),
                final=final,
            )


@dataclass(frozen=True)
class IterationReport:
    """What one iteration achieved, for progress reporting."""

    iteration: int  # 1-based
    total_iterations: int
    particles_seen: int
    resolution_a: float
    temperature: float
    occupancy: np.ndarray  # (K,) expected particles per class
    reseeded: int

    def summary(self, n_particles: int) -> dict[str, float]:
        """Occupancy summary: classes under one particle, the smallest and largest class, and their spread."""
        occupancy = self.occupancy
        return {
            "classes_below_one_particle": float(np.sum(occupancy < 1.0)),
            "smallest_class": float(occupancy.min()),
            "largest_class": float(occupancy.max()),
            "largest_class_fraction": float(occupancy.max() / max(n_particles, 1)),
            "reseeded_classes": float(self.reseeded),
        }


@dataclass(frozen=True)
class ClassificationResult:
    """The outcome of a run: classes in their working order (outputs sort them by count)."""

    averages: np.ndarray  # (K, D, D) float32
    assignment: FinalAssignment
    counts: np.ndarray  # (K,) int64 particles per class in the final hard assignment
    frc: np.ndarray  # (K, D // 2 + 1) float64 half-set FRC of each class
    frc_resolution_a: np.ndarray  # (K,) float64, NaN where a class has too few particles to split
    capacity: int | None
    reseeded: int
