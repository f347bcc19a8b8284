"""2D classification by expectation–maximisation over K classes × in-plane rotations × shifts (SPEC §5.1).

Model. Particle ``i`` is ``X_i = CTF_i · shift_s(rotate_A(T_k)) + noise``: the class average ``T_k`` rotated by an
in-plane matrix ``A`` (:func:`cryostack.core.geometry.rotation_matrix_2d` of ψ, RELION's ``rlnAnglePsi``; the
template is read off at ``Aᵀk`` as in :class:`cryostack.core.projection.Projector2D`), translated by ``s`` pixels
(``rlnOriginXAngst = −s_x · pixel size``), multiplied by its CTF, with Gaussian noise of power ``σ²(ν)`` per
Fourier shell. Scoring uses the half-plane of Fourier coefficients inside the current resolution limit (DC left
out, each coefficient standing for itself and its Friedel mate), sorted by frequency so that any resolution limit
is a prefix of one list.

Pose search (each iteration, every particle against every class). A coarse global search on a low-resolution
prefix of the coefficients (at most :data:`COARSE_SHELLS` shells) over an in-plane angle grid and a shift grid
sized to that resolution (:mod:`cryostack.core.poses`), scored by the shared kernel
(:func:`cryostack.core.scoring.iter_log_likelihoods`) as dense matrix products; then, for each particle's
:data:`CANDIDATE_CLASSES` best classes, a local search at the current resolution on angle and shift grids refined
to it, around the coarse optimum. A class's log-likelihood is the best local score ("force max") or the local
log-sum-exp over poses (marginalised); the other classes keep their coarse score, moved onto the fine scale by the
particle's offset between fine and coarse scores of its last candidate.

E-step. Class responsibilities are the softmax of log-likelihoods divided by the classification uncertainty
factor (a temperature, annealed linearly from its initial value to 1 over the online iterations). With a
``max_particles_per_class`` cap they are instead scaled with upper-bounded class marginals (Sinkhorn–Knopp on a
minibatch, :func:`capacity.capped_responsibilities`; the same scaling by its dual over a whole pass,
:func:`capacity.class_responsibilities`): each class's expected occupancy stays within its capacity, which is the
cap scaled to the minibatch (``cap · B / N``) in online iterations and the full cap in full passes. The last full
iteration assigns every particle to exactly one class, by the exact capacitated assignment
(:func:`capacity.capped_assignment_with_rescoring`) when capped, and reconstructs the classes from those hard
assignments, so reported counts, class averages and ``particles.star`` agree and no class exceeds the cap. Full
passes keep only each particle's :data:`PASS_KEPT_CLASSES` best classes with their poses (memory grows with N, not
N·K); both kinds of pass score again against every class the particles the cap would push beyond their kept
classes, so a soft pass inserts what it would have with all K (to within MIN_INSERT_WEIGHT of a particle) and the
final assignment stays exact over all K.

M-step. CTF-weighted sums ``Σ r·CTF·X`` and ``Σ r·CTF²`` are inserted at each particle's pose into padded 2D
Fourier accumulators (zero-pad factor), one per class and random half-set. Online-EM iterations work on random
minibatches of ``batch_size_per_class · K`` particles and move running sums towards the minibatch's by
``η_t = max(1 / t, ETA_MIN)``; full iterations replace them. An online iteration reads and inserts only the
coefficients it scores (the current resolution plus the margin below), as RELION's current image size does: the
shells beyond stay as they were until the resolution reaches them; full iterations insert every coefficient up to
the maximum resolution. Class averages are Wiener estimates (T = 2) with τ² from
the FRC of the two half-set averages, then multiplied by the soft circular mask and, unless it is the last
iteration, re-centred on their centre of mass (running sums shifted with them). When ``min_particles_per_class``
is set (re-seeding is off by default, as in cryoSPARC), classes whose expected occupancy falls below it are
re-seeded during online iterations by splitting the largest class: the starving class takes the largest class's
half-set-1 average and starts its sums afresh. With a cap, classes move to where the data asks for them the same
way: each online iteration (but the last few) measures every class's demand, its expected occupancy without the
cap, and when the class most over the cap faces an underused class (the least occupied, under 0.75 N/K), the
underused class becomes a split of it. Without this the particles a full class turns away overflow into the classes
of neighbouring views or states (on the floppy benchmark, present-domain particles into domain-absent classes),
while a duplicate of some other class sits half empty.

Noise and resolution. σ²(ν) starts from the background outside the particle mask
(:func:`cryostack.core.noise.noise_power_from_background`) and is re-estimated from the residuals of each
particle's best template at the current resolution. Sigma annealing: the σ² used for scoring moves linearly from
the white spectrum of equal total power to the estimated coloured one over ``sigma_annealing_iterations``
iterations from ``sigma_annealing_start_iteration`` (1-based). The current resolution is the median over populated
classes of the FRC-0.143 resolution; scoring runs :data:`RESOLUTION_MARGIN_SHELLS` shells beyond it, starting at
:data:`INITIAL_RESOLUTION_A`, and never beyond ``max_resolution_a`` (unset: 6 Å, or Nyquist if coarser).

Initial classes are CTF-corrected averages of random particle subsets at random in-plane rotations. Everything
random is drawn from generators seeded by ``(seed, purpose, iteration)``, so a run resumed from the state saved
after any iteration ends exactly as an uninterrupted run.

Backends. Each batch is transformed, CTF-evaluated, scored and inserted in the classifier's array module (numpy,
or cupy on a GPU); what carries from one iteration to the next (class averages, running sums, noise, the
per-particle tables of a full pass) and the small bookkeeping between the searches (candidate classes, pose
indices, the capped E-step) stay on the host.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from types import ModuleType
from typing import Any

import numpy as np

from cryostack.core.backend import array_module, to_host
from cryostack.core.capacity import (
    ClassScores,
    batch_capacity,
    capped_assignment_with_rescoring,
    capped_responsibilities,
    class_responsibilities,
    top_class_columns,
)
from cryostack.core.ctf import CtfParameters
from cryostack.core.fourier import (
    centered_coefficients_2d,
    fft2_centered,
    frequency_radius_px,
    ifft2_centered,
    n_shells,
    nyquist_resolution_a,
    phase_shift_2d,
    resolution_to_shell,
    shell_to_resolution_a,
)
from cryostack.core.fsc import HALF_MAP_THRESHOLD, frc_curves, resolution_at_threshold
from cryostack.core.geometry import rotation_matrix_2d
from cryostack.core.masks import soft_circular_mask
from cryostack.core.noise import noise_power_from_background
from cryostack.core.numerics import random_stream, softmax
from cryostack.core.poses import inplane_angle_step_deg, inplane_angles_deg, shift_grid_px, shift_step_px
from cryostack.core.projection import Projector2D
from cryostack.core.reconstruction import DEFAULT_TAU2_FUDGE_2D, Reconstructor2D, reconstruct_from_sums
from cryostack.core.scoring import (
    LogLikelihoodBlock,
    iter_log_likelihoods,
    local_log_likelihoods,
    prepare_templates,
    shift_phase_ramps,
)
from cryostack.core.sources import ParticleSource
from cryostack.errors import InvalidArgumentError

logger = logging.getLogger(__name__)

# Maximum resolution (Å) when none is given (cryoSPARC's default), unless Nyquist is coarser.
DEFAULT_MAX_RESOLUTION_A = 6.0
# Resolution of the first iteration (Å), before any class has an FRC.
INITIAL_RESOLUTION_A = 25.0
# Shells scored beyond the current (FRC) resolution, so alignment can improve on it.
RESOLUTION_MARGIN_SHELLS = 3
# Largest Fourier shell of the coarse global search; its cost grows as the fifth power of this.
COARSE_SHELLS = 8
# Classes per particle refined by the local search.
CANDIDATE_CLASSES = 4
# Classes per particle a full pass keeps (best first), so that its tables grow with N, not N·K; at least
# INSERT_CLASSES. Particles a cap would push beyond their list are scored again against every class.
PASS_KEPT_CLASSES = 16
# Shift search range as a fraction of the box width (RELION/cryoSPARC search about this much).
MAX_SHIFT_FRACTION = 0.1
# Floor of the online-EM step size: the running sums remember about 1 / ETA_MIN minibatches.
ETA_MIN = 0.3
# A particle enters the M-step of at most this many classes (its most probable ones, weights rescaled to keep the
# particle's total), each with a responsibility of at least MIN_INSERT_WEIGHT: early, soft iterations would
# otherwise insert every particle into every class.
INSERT_CLASSES = 4
MIN_INSERT_WEIGHT = 1e-3
# Poses per (particle, class) inserted in marginalised mode.
MARGINAL_POSES = 3
# With a cap, during the online iterations but the last REBALANCE_SETTLE_ITERATIONS, the class whose uncapped demand
# most exceeds the cap is split into the least occupied class when that one holds under REBALANCE_UNDERUSE · N/K (one
# split per iteration: splitting every such pair at once churns the classes, and purity drops).
REBALANCE_UNDERUSE = 0.75
REBALANCE_SETTLE_ITERATIONS = 4
# Particles sampled for the initial noise spectrum, and per initial class.
NOISE_SAMPLE = 1000
INITIAL_SUBSET = 20
# Classes need this many particles before their FRC counts towards the current resolution.
MIN_FRC_PARTICLES = 10
# Particles scored per pass chunk and inserted per chunk (memory bound).
PASS_BATCH = 1000
_INSERT_CHUNK = 512
# (Particle, class) pairs per local-search call, and the working memory of its blocks.
_LOCAL_PAIRS = 2048
_LOCAL_BYTES = 64 * 2**20

# Purposes of the seeded random streams.
_STREAM_BATCH, _STREAM_NOISE, _STREAM_INIT, _STREAM_HALVES = 1, 2, 3, 4


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


@dataclass(frozen=True)
class _Coefficients:
    """The half-plane Fourier coefficients inside the maximum resolution, sorted by frequency: DC at index 0.

    Class averages are reconstructed from all of them; scoring skips DC (it only carries each image's offset).
    """

    flat: np.ndarray  # (C,) int64 flat indices into the centred D×D grid
    fy: np.ndarray  # (C,) float64 1/Å
    fx: np.ndarray  # (C,) float64 1/Å
    radius: np.ndarray  # (C,) float32 |k| in shells
    shell: np.ndarray  # (C,) int64 round(|k|)
    multiplicity: np.ndarray  # (C,) float32: 2, or 1 for a coefficient that is its own Friedel mate

    def count_within(self, shell_radius: float) -> int:
        """Length of the prefix with |k| <= shell_radius."""
        return int(np.searchsorted(self.radius, np.float32(shell_radius), side="right"))


def half_plane_coefficients(box_px: int, pixel_size_a: float, resolution_a: float) -> _Coefficients:
    """One coefficient of each Friedel pair inside ``resolution_a``, sorted by frequency (DC first)."""
    half = box_px // 2
    radius = frequency_radius_px(box_px, 2).ravel()  # (D²,)
    limit = np.float32(resolution_to_shell(box_px, pixel_size_a, resolution_a))
    flat = np.arange(box_px * box_px)
    ky, kx = flat // box_px - half, flat % box_px - half
    mate = ((-ky + half) % box_px) * box_px + ((-kx + half) % box_px)
    keep = (radius <= limit) & (flat <= mate)
    flat = flat[keep]
    order = np.argsort(radius[flat], kind="stable")
    flat = flat[order]
    ky, kx = flat // box_px - half, flat % box_px - half
    scale = 1.0 / (box_px * pixel_size_a)
    return _Coefficients(
        flat=flat,
        fy=ky * scale,
        fx=kx * scale,
        radius=radius[flat].astype(np.float32),
        shell=np.rint(radius[flat]).astype(np.int64),
        multiplicity=np.where(flat == mate[flat], 1.0, 2.0).astype(np.float32),
    )


@dataclass(frozen=True)
class _SearchPlan:
    """Coefficient prefixes and pose grids of one iteration."""

    fine_count: int  # C2: coefficients scored at the current resolution (prefix [1, C2) of the list, no DC)
    coarse_count: int  # C1 <= C2: prefix end of the coarse global search
    resolution_a: float  # scoring resolution
    coarse_angles_deg: np.ndarray  # (R1,)
    fine_angles_deg: np.ndarray  # (R2,) = R1 · oversampling, coarse angle i at fine index i · oversampling
    angle_oversampling: int
    angle_window: np.ndarray  # (W,) int offsets in fine steps around a coarse angle
    coarse_shifts_px: np.ndarray  # (S1, 2) float32
    local_shifts_px: np.ndarray  # (S2, 2) float32 offsets around a coarse shift


@dataclass
class _Batch:
    """A batch of particles prepared for scoring and insertion (transforms and CTF on the classifier's device)."""

    rows: np.ndarray  # (B,) int64 particle indices
    coefficients: Any  # (B, C) complex64 transforms at a prefix of the half-plane coefficients (DC first)
    ctf: Any | None  # (B, C) float32 CTF at those coefficients (None: no CTF correction)
    half: np.ndarray  # (B,) int64 half-set 0 or 1


@dataclass
class _Alignment:
    """Scores and poses of a batch against every class, or (``classes`` set) against some classes."""

    class_ll: np.ndarray  # (B, K) float64 log-likelihood (force max) or log evidence (marginalised) per class
    angle_deg: np.ndarray  # (B, K) float32 best in-plane angle per class
    shift_px: np.ndarray  # (B, K, 2) float32 best shift per class
    candidates: np.ndarray | None  # (B, Kc) int64 classes refined by the local search
    pose_angle_deg: np.ndarray | None  # (B, Kc, MARGINAL_POSES) marginalised mode: top poses per candidate
    pose_shift_px: np.ndarray | None  # (B, Kc, MARGINAL_POSES, 2)
    pose_weight: np.ndarray | None  # (B, Kc, MARGINAL_POSES) renormalised pose posteriors
    residual_power: np.ndarray  # (shells,) float64 sum over particles of |X - CTF·T|² at the best pose
    residual_count: np.ndarray  # (shells,) float64 number of terms in each sum
    # With ``classes`` (B, M) int32 the columns of class_ll, angle_deg and shift_px are those classes (M of K); the
    # classes left out score at most ``excluded_bound`` (B,) and their likelihoods sum to exp(excluded_log_mass).
    classes: np.ndarray | None = None
    excluded_bound: np.ndarray | None = None
    excluded_log_mass: np.ndarray | None = None

    @staticmethod
    def gather(parts: Iterable[tuple[np.ndarray, _Alignment]], n_rows: int) -> _Alignment:
        """One table of ``n_rows`` particles from batch alignments ``(rows, alignment)``, each written into it as it
        arrives: a full pass holds its per-particle tables once, not also as a list of parts."""
        table: dict[str, np.ndarray | None] = {}
        residual_power: np.ndarray | float = 0.0
        residual_count: np.ndarray | float = 0.0
        for rows, part in parts:
            for name in _PER_PARTICLE_FIELDS:
                values = getattr(part, name)
                if name not in table:
                    table[name] = None if values is None else np.empty((n_rows,) + values.shape[1:], values.dtype)
                column = table[name]
                if column is not None:
                    column[rows] = values
            residual_power = residual_power + part.residual_power
            residual_count = residual_count + part.residual_count
        return _Alignment(**table, residual_power=np.asarray(residual_power), residual_count=np.asarray(residual_count))

    def best_classes(self, count: int, *, marginal_poses: bool) -> _Alignment:
        """The alignment restricted to each particle's ``count`` best classes (best first); with ``marginal_poses``
        the local search's top poses of its candidate classes stay (they grow with N, not K)."""
        top, bound, log_mass = top_class_columns(self.class_ll, count)  # (B, M), (B,), (B,)
        return replace(
            self,
            class_ll=np.take_along_axis(self.class_ll, top, axis=1),
            angle_deg=np.take_along_axis(self.angle_deg, top, axis=1),
            shift_px=np.take_along_axis(self.shift_px, top[:, :, None], axis=1),
            classes=top.astype(np.int32), excluded_bound=bound, excluded_log_mass=log_mass,
            **({} if marginal_poses else dict(candidates=None, pose_angle_deg=None, pose_shift_px=None,
                                              pose_weight=None)),
        )

    def take(self, rows: np.ndarray) -> _Alignment:
        """The alignment of particles ``rows`` (the residual sums stay those of the whole table)."""
        return replace(self, **{
            name: None if getattr(self, name) is None else getattr(self, name)[rows] for name in _PER_PARTICLE_FIELDS
        })


# The fields of an alignment with one row per particle.
_PER_PARTICLE_FIELDS = (
    "class_ll", "angle_deg", "shift_px", "candidates", "pose_angle_deg", "pose_shift_px", "pose_weight", "classes",
    "excluded_bound", "excluded_log_mass",
)


class Classifier2D:
    """2D classification of one particle set (see the module docstring)."""

    def __init__(
        self,
        params: Classify2DParameters,
        particles: ParticleSource,
        pixel_size_a: float,
        ctf: CtfParameters | None,
        seed: int,
        xp: ModuleType = np,
    ) -> None:
        """Validate the parameters against the set and precompute what every iteration shares.

        ``xp`` (numpy, or cupy for the GPU) is where batches are transformed, scored and inserted; the state
        between iterations (class averages, running sums, noise) and the per-particle tables stay on the host.
        """
        self.params = params
        self.xp = xp
        self.particles = particles
        self.n_particles = len(particles)
        self.pixel_size_a = float(pixel_size_a)
        self.box_px = int(particles.box_px)
        validate_parameters(params, self.n_particles, self.box_px, self.pixel_size_a)
        self.ctf = ctf
        self.seed = int(seed)
        self.n_classes = params.class_count
        self.capacity = params.capacity(self.n_particles)
        self.n_shells = n_shells(self.box_px)
        self.max_resolution_a = params.resolution_limit_a(self.pixel_size_a)
        self.coefficients = half_plane_coefficients(self.box_px, self.pixel_size_a, self.max_resolution_a)
        self._fy, self._fx = xp.asarray(self.coefficients.fy), xp.asarray(self.coefficients.fx)  # (C,) on the device
        inner_a, outer_a = params.mask_diameters_a(self.box_px, self.pixel_size_a)
        self.particle_diameter_a = inner_a
        inner_px, outer_px = inner_a / 2 / self.pixel_size_a, outer_a / 2 / self.pixel_size_a
        self.mask = soft_circular_mask(self.box_px, inner_px, outer_px - inner_px)  # (D, D) float32
        self.mask_radius_px = inner_px
        self.max_shift_px = MAX_SHIFT_FRACTION * self.box_px
        halves = random_stream(self.seed, _STREAM_HALVES).permutation(self.n_particles) % 2
        self.half = halves.astype(np.int64)  # (N,) half-set of each particle

    # ----------------------------------------------------------------------------------------------- driving

    def run(
        self,
        state: ClassificationState | None = None,
        on_iteration: Callable[[ClassificationState, IterationReport], None] | None = None,
        check_cancelled: Callable[[], None] | None = None,
    ) -> ClassificationResult:
        """Iterate from ``state`` (a fresh start when None) to the end; ``on_iteration`` sees each new state."""
        state = state if state is not None else self.initial_state()
        total = self.params.total_iterations
        while state.iteration < total:
            if check_cancelled is not None:
                check_cancelled()
            iteration = state.iteration
            if iteration < self.params.online_em_iterations:
                state = self._online_iteration(state, iteration)
            else:
                state = self._full_iteration(state, iteration, final=iteration == total - 1, cancel=check_cancelled)
            if on_iteration is not None:
                on_iteration(state, self._report(state, iteration))
        return self._result(state)

    def temperature(self, iteration: int) -> float:
        """Classification uncertainty factor of a 0-based iteration: linear to 1 over the online iterations."""
        online = self.params.online_em_iterations
        start = self.params.initial_uncertainty_factor
        if iteration >= online or online <= 1:
            return 1.0 if iteration >= online else start
        return start + (1.0 - start) * iteration / (online - 1)

    def sigma_annealing_weight(self, iteration: int) -> float:
        """Weight of the coloured noise estimate against the white spectrum in a 0-based iteration."""
        start = self.params.sigma_annealing_start_iteration
        length = self.params.sigma_annealing_iterations
        number = iteration + 1
        if number < start:
            return 0.0
        if length == 0:
            return 1.0
        return min(1.0, (number - start + 1) / length)

    def _report(self, state: ClassificationState, iteration: int) -> IterationReport:
        return IterationReport(
            iteration=iteration + 1,
            total_iterations=self.params.total_iterations,
            particles_seen=state.particles_seen,
            resolution_a=state.resolution_a,
            temperature=self.temperature(iteration),
            occupancy=state.occupancy.copy(),
            reseeded=state.reseeded,
        )

    # -------------------------------------------------------------------------------------------- start

    def initial_state(self) -> ClassificationState:
        """Noise from the background of a sample, classes from random subsets at random in-plane rotations."""
        n, k = self.n_particles, self.n_classes
        noise_stream = random_stream(self.seed, _STREAM_NOISE)
        sample = np.sort(noise_stream.choice(n, size=min(n, NOISE_SAMPLE), replace=False))
        noise_power = noise_power_from_background(self.particles.read(sample), self.mask_radius_px)

        rng = random_stream(self.seed, _STREAM_INIT)
        per_class = max(1, min(INITIAL_SUBSET, n // k))
        chosen = rng.permutation(n)[: per_class * k]
        classes = np.repeat(np.arange(k), per_class)
        angles = rng.uniform(0.0, 360.0, chosen.size)
        order = np.argsort(chosen)
        chosen, classes, angles = chosen[order], classes[order], angles[order]
        batch = self._prepare(chosen, self.particles.read(chosen))
        reconstructor = Reconstructor2D(k, self.box_px, pad_factor=self.params.zero_pad_factor, xp=self.xp)
        reconstructor.insert(
            batch.coefficients, rotation_matrix_2d(angles), classes, ctf=batch.ctf, coefficients=self.coefficients.flat
        )
        averages = to_host(reconstructor.reconstruct()) * self.mask
        padded = self.params.zero_pad_factor * self.box_px
        return ClassificationState(
            iteration=0,
            averages=averages.astype(np.float32),
            sums_data=np.zeros((2, k, padded, padded), dtype=np.complex64),
            sums_weight=np.zeros((2, k, padded, padded), dtype=np.float32),
            occupancy=np.full(k, n / k),
            noise_power=np.asarray(noise_power, dtype=np.float64),
            frc=np.zeros((k, self.n_shells)),
            resolution_a=max(INITIAL_RESOLUTION_A, self.max_resolution_a),
            particles_seen=0,
            reseeded=0,
        )

    # ---------------------------------------------------------------------------------------- iterations

    def _online_iteration(self, state: ClassificationState, iteration: int) -> ClassificationState:
        """Score a random minibatch, capped E-step, move the running sums towards the minibatch's."""
        size = min(self.n_particles, self.params.batch_size_per_class * self.n_classes)
        batch_stream = random_stream(self.seed, _STREAM_BATCH, iteration)
        rows = np.sort(batch_stream.choice(self.n_particles, size=size, replace=False))
        plan = self._plan(state.resolution_a)
        batch = self._prepare(rows, self.particles.read(rows), plan.fine_count)
        scorer = self._scorer(state, plan, iteration)
        alignment = scorer(batch)
        temperature = self.temperature(iteration)
        responsibilities = self._responsibilities(alignment.class_ll / temperature, size)
        sums = self._accumulate([(batch, alignment, responsibilities)])
        eta = max(1.0 / (iteration + 1), ETA_MIN)
        occupancy = responsibilities.sum(axis=0) * (self.n_particles / size)
        state = self._m_step(state, sums, eta, occupancy, alignment, plan, recenter=self.params.recenter_classes)
        state.particles_seen += size
        state.iteration = iteration + 1
        state = self._reseed(state)
        if self.capacity is not None:
            demand = softmax(alignment.class_ll / temperature, axis=1).sum(axis=0) * (self.n_particles / size)
            state = self._rebalance(state, demand)
        return state

    def _full_iteration(
        self, state: ClassificationState, iteration: int, *, final: bool, cancel: Callable[[], None] | None
    ) -> ClassificationState:
        """Score every particle, then E-step over the whole set (hard and capped when final) and M-step."""
        plan = self._plan(state.resolution_a)
        scorer = self._scorer(state, plan, iteration)

        def aligned_batches() -> Iterator[tuple[np.ndarray, _Alignment]]:
            """Each particle's best classes with their poses (a soft pass also keeps its candidates' marginal
            poses)."""
            for rows, images in self.particles.iter_batches(None, PASS_BATCH):
                if cancel is not None:
                    cancel()
                aligned = scorer(self._prepare(rows, images))
                yield rows, aligned.best_classes(PASS_KEPT_CLASSES, marginal_poses=not final)

        alignment = _Alignment.gather(aligned_batches(), self.n_particles)
        weights_of: Callable[[np.ndarray], np.ndarray]
        if final:
            state.final = self._final_assignment(alignment, scorer)
            # Hard assignment: one pose per particle, the best of its class, in both modes.
            alignment = replace(
                alignment, class_ll=np.zeros((self.n_particles, 1)), angle_deg=state.final.psi_deg[:, None],
                shift_px=state.final.shift_px[:, None, :], classes=state.final.labels[:, None],
                excluded_bound=None, excluded_log_mass=None,
            )
            weights_of = _full_weight
            occupancy = np.bincount(state.final.labels, minlength=self.n_classes).astype(np.float64)
        else:
            responsibilities, occupancy = self._soft_assignment(alignment, scorer)
            weights_of = responsibilities.__getitem__
        sums = self._pass_sums(alignment, weights_of, cancel)
        state = self._m_step(
            state, sums, 1.0, occupancy, alignment, plan, recenter=self.params.recenter_classes and not final
        )
        state.particles_seen += self.n_particles
        state.iteration = iteration + 1
        return state

    def _soft_assignment(
        self, alignment: _Alignment, scorer: Callable[[_Batch], _Alignment]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Responsibilities (N, M) over each particle's best classes ``alignment`` (N, M, updated in place), capped
        when a cap is set, and the classes' expected occupancy (K,).

        A particle enters its most probable classes with its whole weight (see INSERT_CLASSES), so uncapped the
        classes it leaves out change nothing. A cap scales the kept classes down, and the ones left out keep their
        unscaled mass: a particle whose left-out classes could so hold MIN_INSERT_WEIGHT of it is scored again
        against every class, the scaling solved again, and it keeps the M classes it is now most likely in.
        """
        k = self.n_classes
        width = alignment.classes.shape[1]
        scores = ClassScores.from_columns(
            alignment.classes, alignment.class_ll, alignment.excluded_bound, alignment.excluded_log_mass, k
        )
        capacity = None if self.capacity is None else np.full(k, float(self.capacity))
        rescored: list[tuple[np.ndarray, _Alignment]] = []
        while True:
            responsibilities = class_responsibilities(scores, capacity)  # (E,)
            if capacity is None:
                break
            left_out = 1.0 - np.add.reduceat(responsibilities, scores.row_start[:-1])  # (N,) their share
            again = np.flatnonzero((left_out > MIN_INSERT_WEIGHT) & np.isfinite(scores.excluded_bound))
            if again.size == 0:
                break
            full = self._score_every_class(scorer, again)
            rescored.append((again, full))
            scores = scores.with_full_rows(again, full.class_ll)
        occupancy = np.bincount(scores.classes, responsibilities, k)
        weights = responsibilities[scores.row_start[:-1, None] + np.arange(width)]  # (N, M) the rows' first entries
        # Rows listed in full take their most likely classes with poses from the full row (their candidates' marginal
        # poses are the same as the first scoring's).
        for rows, full in rescored:
            listed = responsibilities[scores.row_start[rows, None] + np.arange(k)]  # (V, K)
            top = np.argsort(-listed, axis=1, kind="stable")[:, :width]  # (V, M)
            weights[rows] = np.take_along_axis(listed, top, axis=1)
            alignment.classes[rows] = top
            alignment.class_ll[rows] = np.take_along_axis(full.class_ll, top, axis=1)
            alignment.angle_deg[rows] = np.take_along_axis(full.angle_deg, top, axis=1)
            alignment.shift_px[rows] = np.take_along_axis(full.shift_px, top[:, :, None], axis=1)
        if rescored:
            logger.info("soft full pass: %d particles scored again against every class",
                        sum(rows.size for rows, _ in rescored))
        return weights / weights.sum(axis=1, keepdims=True), occupancy

    def _final_assignment(
        self, alignment: _Alignment, scorer: Callable[[_Batch], _Alignment]
    ) -> FinalAssignment:
        """Each particle's class from its best classes ``alignment`` (N, M): the argmax, or the exact capped
        assignment (particles it would send beyond their M are scored again against every class); its pose and
        probability."""
        n, k = self.n_particles, self.n_classes
        scores = ClassScores.from_columns(
            alignment.classes, alignment.class_ll, alignment.excluded_bound, alignment.excluded_log_mass, k
        )
        rescored: list[tuple[np.ndarray, _Alignment]] = []

        def score_every_class(rows: np.ndarray) -> np.ndarray:
            full = self._score_every_class(scorer, rows)
            rescored.append((rows, full))
            return full.class_ll

        if self.capacity is None:
            entries = scores.row_start[:-1]  # each row's best class comes first
            capacity = start_log_scale = None
        else:
            capacity = np.full(k, self.capacity)
            entries, scores, prices = capped_assignment_with_rescoring(scores, capacity, score_every_class)
            start_log_scale = -prices  # the soft cap's scaling starts from the hard one's duals
        labels = scores.classes[entries].astype(np.int64)
        # The label's column among the kept classes; a row scored again lists all K, and its pose is taken below.
        columns = np.minimum(entries - scores.row_start[:-1], alignment.classes.shape[1] - 1)  # (N,)
        psi_deg = alignment.angle_deg[np.arange(n), columns].astype(np.float64)
        shift_px = alignment.shift_px[np.arange(n), columns].astype(np.float64)
        for rows, full in rescored:  # each row is scored again at most once
            psi_deg[rows] = full.angle_deg[np.arange(rows.size), labels[rows]]
            shift_px[rows] = full.shift_px[np.arange(rows.size), labels[rows]]
        if rescored:
            logger.info("final assignment: %d particles scored again against every class",
                        sum(rows.size for rows, _ in rescored))
        return FinalAssignment(
            labels=labels, psi_deg=psi_deg, shift_px=shift_px,
            probability=class_responsibilities(scores, capacity, start_log_scale=start_log_scale)[entries],
        )

    def _score_every_class(self, scorer: Callable[[_Batch], _Alignment], rows: np.ndarray) -> _Alignment:
        """Scores and poses of particles ``rows`` (V,), ascending, against every class: read and scored
        PASS_BATCH at a time, as a pass is."""
        parts = ((np.searchsorted(rows, chunk), scorer(self._prepare(chunk, images)))
                 for chunk, images in self.particles.iter_batches(rows, PASS_BATCH))
        return _Alignment.gather(parts, rows.size)

    def _responsibilities(self, log_weights: np.ndarray, batch_size: int) -> np.ndarray:
        """Class responsibilities (B, K): the posterior, or the capped one when a cap is set."""
        if self.capacity is None:
            return softmax(log_weights, axis=1)
        capacity = batch_capacity(np.full(self.n_classes, float(self.capacity)), batch_size, self.n_particles)
        return capped_responsibilities(log_weights, capacity)

    def _pass_sums(
        self,
        alignment: _Alignment,
        weights_of: Callable[[np.ndarray], np.ndarray],
        cancel: Callable[[], None] | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Read the set again and insert every particle with its class weights ``weights_of(rows)`` (B, K)."""
        reconstructors = self._reconstructors()
        for rows, images in self.particles.iter_batches(None, PASS_BATCH):
            if cancel is not None:
                cancel()
            self._insert(reconstructors, self._prepare(rows, images), alignment.take(rows), weights_of(rows))
        return self._padded_sums(reconstructors)

    # ------------------------------------------------------------------------------------ preparation

    def _prepare(self, rows: np.ndarray, images: np.ndarray, count: int | None = None) -> _Batch:
        """Transforms and CTF of a batch of images (B, D, D) at the first ``count`` coefficients (None: all)."""
        kept = slice(0, count)
        coefficients = centered_coefficients_2d(self.xp.asarray(images), self.coefficients.flat[kept])  # (B, C)
        ctf = None if self.ctf is None else self.ctf.take(rows).at(self._fy[kept], self._fx[kept])
        return _Batch(rows, coefficients, ctf, self.half[rows])

    def _plan(self, resolution_a: float) -> _SearchPlan:
        """Scoring prefix and pose grids for the current resolution."""
        max_shell = resolution_to_shell(self.box_px, self.pixel_size_a, self.max_resolution_a)
        current_shell = resolution_to_shell(self.box_px, self.pixel_size_a, resolution_a)
        fine_shell = min(max_shell, current_shell + RESOLUTION_MARGIN_SHELLS)
        coarse_shell = min(fine_shell, COARSE_SHELLS)
        fine_res = shell_to_resolution_a(self.box_px, self.pixel_size_a, fine_shell)
        coarse_res = shell_to_resolution_a(self.box_px, self.pixel_size_a, coarse_shell)
        coarse_angles = inplane_angles_deg(coarse_res, self.particle_diameter_a)
        coarse_step = 360.0 / coarse_angles.size
        oversampling = max(1, math.ceil(coarse_step / inplane_angle_step_deg(fine_res, self.particle_diameter_a)))
        fine_angles = np.arange(coarse_angles.size * oversampling) * (coarse_step / oversampling)
        reach = math.ceil(oversampling / 2)
        coarse_shifts = shift_grid_px(coarse_res, self.pixel_size_a, self.max_shift_px)
        coarse_shift_step = shift_step_px(coarse_res, self.pixel_size_a)
        fine_shift_step = min(coarse_shift_step, shift_step_px(fine_res, self.pixel_size_a))
        shift_oversampling = max(1, math.ceil(coarse_shift_step / fine_shift_step))
        shift_reach = math.ceil(shift_oversampling / 2)
        offsets = np.arange(-shift_reach, shift_reach + 1) * (coarse_shift_step / shift_oversampling)
        local_x, local_y = np.meshgrid(offsets, offsets, indexing="xy")
        return _SearchPlan(
            fine_count=self.coefficients.count_within(fine_shell),
            coarse_count=self.coefficients.count_within(coarse_shell),
            resolution_a=fine_res,
            coarse_angles_deg=coarse_angles,
            fine_angles_deg=fine_angles,
            angle_oversampling=oversampling,
            angle_window=np.arange(-reach, reach + 1),
            coarse_shifts_px=coarse_shifts,
            local_shifts_px=np.stack([local_x.ravel(), local_y.ravel()], axis=1).astype(np.float32),
        )

    def _noise_variance(self, state: ClassificationState, iteration: int, count: int) -> np.ndarray:
        """σ² per scored coefficient (list positions 1 .. count-1) after sigma annealing, over the multiplicity."""
        estimate = np.maximum(state.noise_power, 1e-30)  # (shells,)
        shells = self.coefficients.shell[1:count]
        inside = np.arange(self.n_shells) <= shells.max(initial=0)
        counts = np.bincount(shells, minlength=self.n_shells).astype(np.float64)
        white = float(np.sum(estimate[inside] * counts[inside]) / max(counts[inside].sum(), 1.0))
        alpha = self.sigma_annealing_weight(iteration)
        annealed = (1.0 - alpha) * white + alpha * estimate
        return (annealed[shells] / self.coefficients.multiplicity[1:count]).astype(np.float32)

    # ---------------------------------------------------------------------------------------- E-step

    def _scorer(
        self, state: ClassificationState, plan: _SearchPlan, iteration: int
    ) -> Callable[[_Batch], _Alignment]:
        """A function aligning batches against the current classes (templates and grids built once)."""
        n_coarse = plan.coarse_count - 1
        flat = self.coefficients.flat[1 : plan.fine_count]  # (C2 - 1,) scored coefficients, DC left out
        xp = self.xp
        projector = Projector2D(xp.asarray(state.averages), pad_factor=self.params.zero_pad_factor)
        coarse = projector.rotate(rotation_matrix_2d(plan.coarse_angles_deg), coefficients=flat[:n_coarse])
        coarse_templates = prepare_templates(coarse.reshape(-1, n_coarse))  # (K·R1, C1 - 1)
        fine = projector.rotate(rotation_matrix_2d(plan.fine_angles_deg), coefficients=flat)  # (K, R2, C2)
        coarse_ramps = shift_phase_ramps(xp.asarray(plan.coarse_shifts_px), self.box_px, flat)  # (S1, C2)
        local_ramps = shift_phase_ramps(xp.asarray(plan.local_shifts_px), self.box_px, flat)  # (S2, C2)
        noise_var = self._noise_variance(state, iteration, plan.fine_count)  # (C2 - 1,)
        return lambda batch: self._align(batch, plan, coarse_templates, fine, coarse_ramps, local_ramps, noise_var)

    def _align(
        self,
        batch: _Batch,
        plan: _SearchPlan,
        coarse_templates: Any,
        fine: Any,
        coarse_ramps: Any,
        local_ramps: Any,
        noise_var: np.ndarray,
    ) -> _Alignment:
        """Coarse global search over all classes, then local refinement of each particle's candidate classes.

        ``fine`` (K, R2, C2) templates and the ramps live on the device; the alignment returned is host arrays.
        """
        xp = self.xp
        k, n_coarse, scored = self.n_classes, plan.coarse_count - 1, slice(1, plan.fine_count)
        n_rows = len(batch.rows)
        r1 = plan.coarse_angles_deg.size
        x = batch.coefficients[:, scored]  # (B, C2 - 1)
        ctf = None if batch.ctf is None else batch.ctf[:, scored]
        coarse_ll = xp.full((n_rows, k), -np.inf)
        coarse_angle = xp.zeros((n_rows, k), dtype=np.int64)
        coarse_shift = xp.zeros((n_rows, k), dtype=np.int64)
        for block in iter_log_likelihoods(
            x[:, :n_coarse], coarse_templates, ctf=None if ctf is None else ctf[:, :n_coarse],
            noise_var=noise_var[:n_coarse], shift_ramps=coarse_ramps[:, :n_coarse],
        ):
            p = block.particles
            _fold_coarse_block(block, r1, coarse_ll[p], coarse_angle[p], coarse_shift[p])
        coarse_ll, coarse_angle, coarse_shift = to_host(coarse_ll), to_host(coarse_angle), to_host(coarse_shift)

        n_candidates = min(k, CANDIDATE_CLASSES)
        candidates = np.argsort(-coarse_ll, axis=1, kind="stable")[:, :n_candidates]  # (B, Kc) best first
        rows = np.repeat(np.arange(n_rows), n_candidates)
        classes = candidates.ravel()
        local = self._local_search(
            x, ctf, noise_var, fine, coarse_ramps, local_ramps, plan,
            rows, classes, coarse_angle[rows, classes], coarse_shift[rows, classes],
        )

        class_ll = coarse_ll.astype(np.float64)
        angle = plan.coarse_angles_deg[coarse_angle].astype(np.float32)
        shift = plan.coarse_shifts_px[coarse_shift].astype(np.float32)  # (B, K, 2)
        fine_ll = local["score"].reshape(n_rows, n_candidates)
        # Non-candidates move onto the fine scale by the offset of the particle's last candidate.
        offset = fine_ll[:, -1] - coarse_ll[np.arange(n_rows), candidates[:, -1]]
        class_ll += offset[:, None]
        np.put_along_axis(class_ll, candidates, fine_ll, axis=1)
        np.put_along_axis(angle, candidates, local["angle_deg"].reshape(n_rows, n_candidates), axis=1)
        np.put_along_axis(shift, candidates[..., None], local["shift_px"].reshape(n_rows, n_candidates, 2), axis=1)

        marginal = not self.params.force_max_over_poses_shifts
        residual_power, residual_count = self._residual_power(
            x, ctf, fine, plan, local, candidates, class_ll, n_candidates
        )
        return _Alignment(
            class_ll=class_ll,
            angle_deg=angle,
            shift_px=shift,
            candidates=candidates,
            pose_angle_deg=local["pose_angle_deg"].reshape(n_rows, n_candidates, -1) if marginal else None,
            pose_shift_px=local["pose_shift_px"].reshape(n_rows, n_candidates, MARGINAL_POSES, 2) if marginal else None,
            pose_weight=local["pose_weight"].reshape(n_rows, n_candidates, -1) if marginal else None,
            residual_power=residual_power,
            residual_count=residual_count,
        )

    def _local_search(
        self,
        x: Any,
        ctf: Any | None,
        noise_var: np.ndarray,
        fine: Any,
        coarse_ramps: Any,
        local_ramps: Any,
        plan: _SearchPlan,
        rows: np.ndarray,
        classes: np.ndarray,
        coarse_angle: np.ndarray,
        coarse_shift: np.ndarray,
    ) -> dict[str, np.ndarray]:
        """Score (particle, class) pairs on the local fine grid around their coarse pose at the full prefix.

        The particles ``x``, ``ctf``, templates and ramps are on the device; pair indices and results on the host.
        """
        xp = self.xp
        n_pairs = rows.size
        r2 = plan.fine_angles_deg.size
        window = plan.angle_window  # (W,)
        n_window, n_local = window.size, plan.local_shifts_px.shape[0]
        angle_index = (coarse_angle[:, None] * plan.angle_oversampling + window[None, :]) % r2  # (pairs, W)
        table = fine.reshape(-1, fine.shape[-1])  # (K·R2, C2): class k's angle j at row k·R2 + j
        local_ll = np.empty((n_pairs, n_local, n_window), dtype=np.float32)
        for start in range(0, n_pairs, _LOCAL_PAIRS):
            chunk = slice(start, start + _LOCAL_PAIRS)
            # Each pair's particle, moved back by its coarse shift, against its class's W angles around the coarse one.
            pair_rows = xp.asarray(rows[chunk])
            local_ll[chunk] = to_host(local_log_likelihoods(
                x[pair_rows] * coarse_ramps[xp.asarray(coarse_shift[chunk])], table,
                classes[chunk, None] * r2 + angle_index[chunk],
                ctf=None if ctf is None else ctf[pair_rows], noise_var=noise_var, shift_ramps=local_ramps,
                max_bytes=_LOCAL_BYTES,
            ))  # (P, S2, W)
        flat_scores = local_ll.reshape(n_pairs, -1).astype(np.float64)  # (pairs, S2·W)
        pairs = np.arange(n_pairs)
        best = np.argmax(flat_scores, axis=1)
        shift_index, window_index = np.divmod(best, n_window)
        best_angle = angle_index[pairs, window_index]
        centre_px = plan.coarse_shifts_px[coarse_shift]  # (pairs, 2)
        out = {
            "score": flat_scores[pairs, best],
            "angle_index": best_angle,
            "shift_index": shift_index,
            "angle_deg": plan.fine_angles_deg[best_angle].astype(np.float32),
            "shift_px": (centre_px + plan.local_shifts_px[shift_index]).astype(np.float32),
        }
        if self.params.force_max_over_poses_shifts:
            return out
        # Marginalised: the class's evidence is the log-mean of the pose likelihoods on the local grid.
        relative = np.exp(flat_scores - out["score"][:, None])  # (pairs, S2·W)
        out["score"] = out["score"] + np.log(relative.sum(axis=1) / (n_local * n_window))
        top = np.argsort(-flat_scores, axis=1, kind="stable")[:, :MARGINAL_POSES]  # (pairs, MARGINAL_POSES)
        top_shift, top_window = np.divmod(top, n_window)
        top_weight = np.take_along_axis(relative, top, axis=1)
        out["pose_weight"] = (top_weight / top_weight.sum(axis=1, keepdims=True)).astype(np.float32)
        out["pose_angle_deg"] = plan.fine_angles_deg[np.take_along_axis(angle_index, top_window, axis=1)].astype(
            np.float32
        )
        out["pose_shift_px"] = (centre_px[:, None, :] + plan.local_shifts_px[top_shift]).astype(np.float32)
        return out

    def _residual_power(
        self,
        x: Any,
        ctf: Any | None,
        fine: Any,
        plan: _SearchPlan,
        local: dict[str, np.ndarray],
        candidates: np.ndarray,
        class_ll: np.ndarray,
        n_candidates: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per-shell sums of ``|X − CTF·T|²`` at each particle's best class and pose (residual noise estimate)."""
        xp = self.xp
        n_rows, n_scored = x.shape
        best_candidate = np.argmax(np.take_along_axis(class_ll, candidates, axis=1), axis=1)  # (B,)
        pair = np.arange(n_rows) * n_candidates + best_candidate
        best_class, best_angle = candidates[np.arange(n_rows), best_candidate], local["angle_index"][pair]
        templates = fine[xp.asarray(best_class), xp.asarray(best_angle)]  # (B, C)
        shifts = local["shift_px"][pair]  # (B, 2) image shifts
        flat = self.coefficients.flat[1 : 1 + n_scored]
        ramps = _pair_ramps(xp.asarray(shifts), self.box_px, flat)  # (B, C): moves each particle back by -s
        prediction = templates if ctf is None else templates * ctf
        residual = x * ramps - prediction
        power = (residual.real**2 + residual.imag**2).astype(np.float64)  # (B, C)
        shells = self.coefficients.shell[1 : 1 + n_scored]
        return (
            np.bincount(shells, weights=to_host(power.sum(axis=0)), minlength=self.n_shells)[: self.n_shells],
            np.bincount(shells, minlength=self.n_shells)[: self.n_shells] * float(n_rows),
        )

    # ---------------------------------------------------------------------------------------- M-step

    def _reconstructors(self) -> list[Reconstructor2D]:
        return [
            Reconstructor2D(self.n_classes, self.box_px, pad_factor=self.params.zero_pad_factor, xp=self.xp)
            for _ in (0, 1)
        ]

    @staticmethod
    def _padded_sums(reconstructors: list[Reconstructor2D]) -> tuple[np.ndarray, np.ndarray]:
        """Half-set padded sums on the host: data (2, K, P, P) complex64, weight (2, K, P, P) float32."""
        pairs = [r.accumulator.padded_sums() for r in reconstructors]
        return np.stack([to_host(p[0]) for p in pairs]), np.stack([to_host(p[1]) for p in pairs])

    def _accumulate(self, parts: list[tuple[_Batch, _Alignment, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        """Insert batches with their responsibilities into fresh half-set accumulators."""
        reconstructors = self._reconstructors()
        for batch, alignment, weights in parts:
            self._insert(reconstructors, batch, alignment, weights)
        return self._padded_sums(reconstructors)

    def _insert(
        self, reconstructors: list[Reconstructor2D], batch: _Batch, alignment: _Alignment, weights: np.ndarray
    ) -> None:
        """Insert each particle into every class it belongs to with weight >= MIN_INSERT_WEIGHT, at its pose(s).

        Insertions are ordered by half-set, class and angle, so that each chunk's insertions at a common pose are
        summed by the accumulator and interpolated once.
        """
        xp = self.xp
        member, cls, angle, shift, weight = _insertions(alignment, weights)
        order = np.lexsort((angle, cls, batch.half[member]))
        member, cls, angle, shift, weight = member[order], cls[order], angle[order], shift[order], weight[order]
        flat = self.coefficients.flat[: batch.coefficients.shape[1]]
        for start in range(0, member.size, _INSERT_CHUNK):
            chunk = slice(start, start + _INSERT_CHUNK)
            rows = member[chunk]
            on_device = xp.asarray(rows)
            # Undo each particle's shift; one of each Friedel pair is inserted (the accumulator symmetrises).
            ramps = _pair_ramps(xp.asarray(shift[chunk].astype(np.float64)), self.box_px, flat)
            images = batch.coefficients[on_device] * ramps
            ctf = None if batch.ctf is None else batch.ctf[on_device]
            rotations = rotation_matrix_2d(angle[chunk].astype(np.float64))
            for half in (0, 1):
                take = np.flatnonzero(batch.half[rows] == half)
                if take.size == 0:
                    continue
                taken = xp.asarray(take)
                reconstructors[half].insert(
                    images[taken], rotations[take], cls[chunk][take],
                    ctf=None if ctf is None else ctf[taken], weights=weight[chunk][take], coefficients=flat,
                )

    def _m_step(
        self,
        state: ClassificationState,
        sums: tuple[np.ndarray, np.ndarray],
        eta: float,
        occupancy: np.ndarray,
        alignment: _Alignment,
        plan: _SearchPlan,
        *,
        recenter: bool,
    ) -> ClassificationState:
        """Running sums, half-set FRC, Wiener class averages, mask, re-centring, noise and resolution."""
        data = (1.0 - eta) * state.sums_data + eta * sums[0]
        weight = (1.0 - eta) * state.sums_weight + eta * sums[1]
        frc = self._half_set_frc(data, weight)
        averages = self._wiener_averages(data, weight, frc)
        if recenter:
            averages, data = self._recenter(averages, data)
        occupancy = (1.0 - eta) * state.occupancy + eta * occupancy

        noise_power = state.noise_power.copy()
        measured = alignment.residual_count > 0
        fresh = alignment.residual_power[measured] / alignment.residual_count[measured]
        noise_power[measured] = (1.0 - eta) * noise_power[measured] + eta * fresh

        resolutions = np.array([
            resolution_at_threshold(frc[c], self.box_px, self.pixel_size_a, HALF_MAP_THRESHOLD)
            for c in range(self.n_classes)
        ])
        populated = occupancy >= MIN_FRC_PARTICLES
        resolution = float(np.median(resolutions[populated])) if populated.any() else state.resolution_a
        resolution = min(max(resolution, self.max_resolution_a), max(INITIAL_RESOLUTION_A, self.max_resolution_a))
        return ClassificationState(
            iteration=state.iteration,
            averages=averages.astype(np.float32),
            sums_data=data.astype(np.complex64),
            sums_weight=weight.astype(np.float32),
            occupancy=occupancy,
            noise_power=noise_power,
            frc=frc,
            resolution_a=resolution,
            particles_seen=state.particles_seen,
            reseeded=state.reseeded,
            final=state.final,
        )

    def _half_set_frc(self, data: np.ndarray, weight: np.ndarray) -> np.ndarray:
        """FRC (K, shells) of each class's two half-set averages (plainly regularised)."""
        halves = [reconstruct_from_sums(data[h], weight[h], self.box_px, 2) for h in (0, 1)]
        frc = frc_curves(halves[0] * self.mask, halves[1] * self.mask)
        return np.nan_to_num(np.asarray(frc, dtype=np.float64))

    def _wiener_averages(self, data: np.ndarray, weight: np.ndarray, frc: np.ndarray) -> np.ndarray:
        """Class averages (K, D, D) from both halves with τ² from the full-set FRC, 2·FRC / (1 + FRC)."""
        full_frc = 2.0 * np.clip(frc, 0.0, None) / (1.0 + np.clip(frc, 0.0, None))
        averages = reconstruct_from_sums(
            data.sum(axis=0), weight.sum(axis=0), self.box_px, 2, fsc=full_frc, tau2_fudge=DEFAULT_TAU2_FUDGE_2D
        )
        return averages * self.mask

    def _recenter(self, averages: np.ndarray, data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Shift each class average (and its running sums) so its positive density's centre of mass is the origin."""
        coords = np.arange(self.box_px) - self.box_px // 2
        density = np.clip(averages, 0.0, None)  # (K, D, D)
        mass = density.sum(axis=(1, 2))
        safe = np.where(mass > 0, mass, 1.0)
        centre = np.stack([
            (density.sum(axis=1) * coords).sum(axis=1) / safe,  # x
            (density.sum(axis=2) * coords).sum(axis=1) / safe,  # y
        ], axis=1)  # (K, 2)
        centre[mass <= 0] = 0.0
        shifts = -centre  # moving the content by -centre puts its centre at the origin
        recentred = ifft2_centered(phase_shift_2d(fft2_centered(averages), shifts)).real.astype(np.float32)
        moved = phase_shift_2d(data, np.broadcast_to(shifts, (2,) + shifts.shape))
        return recentred * self.mask, moved

    def _rebalance(self, state: ClassificationState, demand: np.ndarray) -> ClassificationState:
        """Split the class most over the cap into the least occupied class, when that one is underused.

        ``demand`` (K,) is each class's expected occupancy without the cap, scaled to the whole set.
        """
        assert self.capacity is not None
        if state.iteration >= self.params.online_em_iterations - REBALANCE_SETTLE_ITERATIONS:
            return state
        source, target = int(np.argmax(demand)), int(np.argmin(state.occupancy))
        underused = state.occupancy[target] < REBALANCE_UNDERUSE * self.n_particles / self.n_classes
        if demand[source] >= self.capacity and underused and source != target:
            self._split(state, source, target)
        return state

    def _split(self, state: ClassificationState, source: int, target: int) -> None:
        """Class ``target`` restarts from the half-set-1 average of class ``source``; they share its occupancy."""
        half = reconstruct_from_sums(
            state.sums_data[0, source], state.sums_weight[0, source], self.box_px, 2,
            fsc=state.frc[source], tau2_fudge=DEFAULT_TAU2_FUDGE_2D,
        )
        state.averages[target] = half * self.mask
        state.sums_data[:, target] = 0
        state.sums_weight[:, target] = 0
        state.occupancy[[target, source]] = state.occupancy[source] / 2
        state.frc[target] = state.frc[source]
        state.reseeded += 1

    def _reseed(self, state: ClassificationState) -> ClassificationState:
        """Split the largest class into each class whose expected occupancy is below the threshold."""
        threshold = self.params.reseed_threshold()
        if threshold is None or state.iteration >= self.params.online_em_iterations:
            return state
        for starving in np.flatnonzero(state.occupancy < threshold):
            largest = int(np.argmax(state.occupancy))
            if largest == starving or state.occupancy[largest] < 2 * threshold:
                continue
            self._split(state, largest, starving)
        return state

    # ---------------------------------------------------------------------------------------- result

    def _result(self, state: ClassificationState) -> ClassificationResult:
        assert state.final is not None, "the last full iteration sets the final assignment"
        labels = state.final.labels
        counts = np.bincount(labels, minlength=self.n_classes)
        half_counts = np.stack([np.bincount(labels[self.half == h], minlength=self.n_classes) for h in (0, 1)])
        resolutions = np.array([
            resolution_at_threshold(state.frc[c], self.box_px, self.pixel_size_a, HALF_MAP_THRESHOLD)
            if half_counts[:, c].min() >= 1 else np.nan
            for c in range(self.n_classes)
        ])
        return ClassificationResult(
            averages=state.averages,
            assignment=state.final,
            counts=counts,
            frc=state.frc,
            frc_resolution_a=resolutions,
            capacity=self.capacity,
            reseeded=state.reseeded,
        )


def _fold_coarse_block(
    block: LogLikelihoodBlock, angles_per_class: int, best_ll: Any, best_angle: Any, best_shift: Any
) -> None:
    """Fold a block of coarse scores into each particle's best (angle, shift) per class, in place.

    ``block`` scores its particles against templates of the (K·R1,) class-major grid; ``best_*`` (n, K) are those
    particles' running bests. The maximum over shifts is a fast reduction, taken before the shift-free offset comes
    off; the arg-max over shifts is taken only at each class's winning angle (an arg-max over the middle axis of
    the whole block costs more than the GEMM that made it). Ties keep the first angle and shift, as ``argmax`` does.
    """
    values, templates = block.shift_terms, block.templates  # (n, S, m)
    xp = array_module(values)
    n, r1 = values.shape[0], angles_per_class
    first, last = templates.start // r1, -(-templates.stop // r1)  # classes this block touches
    per_template = xp.full((n, (last - first) * r1), -np.inf, dtype=np.float32)
    per_template[:, templates.start - first * r1 : templates.stop - first * r1] = values.max(axis=1) - block.offset
    per_class = per_template.reshape(n, last - first, r1)
    angle = per_class.argmax(axis=2)  # (n, k_block)
    value = xp.take_along_axis(per_class, angle[..., None], axis=2)[..., 0]
    in_block = xp.clip(xp.arange(first, last)[None, :] * r1 + angle - templates.start, 0, values.shape[2] - 1)
    shift = values[xp.arange(n)[:, None], :, in_block].argmax(axis=2)  # (n, k_block)
    better = value > best_ll[:, first:last]
    best_ll[:, first:last][better] = value[better]
    best_angle[:, first:last][better] = angle[better]
    best_shift[:, first:last][better] = shift[better]


def _full_weight(rows: np.ndarray) -> np.ndarray:
    """Weights (B, 1): each particle of ``rows`` wholly in the one class its alignment lists."""
    return np.ones((rows.size, 1))


def _pair_ramps(shifts_px: Any, box_px: int, flat: np.ndarray) -> Any:
    """Phase ramps (B, C) complex64 moving each particle back by its own shift (B, 2) at flat coefficient indices,
    on the shifts' device."""
    # exp(2πi (kx·sx + ky·sy) / D) factorises over the axes: 2·B·D exponentials instead of B·C.
    xp = array_module(shifts_px)
    k = xp.arange(box_px) - box_px // 2
    scale = 2j * np.pi / box_px
    along_x = xp.exp(scale * shifts_px[:, :1] * k[None, :]).astype(np.complex64)  # (B, D)
    along_y = xp.exp(scale * shifts_px[:, 1:] * k[None, :]).astype(np.complex64)  # (B, D)
    flat = xp.asarray(flat)
    return along_x[:, flat % box_px] * along_y[:, flat // box_px]


def _insertions(
    alignment: _Alignment, weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(row, class, angle_deg, shift_px (M, 2), weight) of every insertion a batch makes; ``weights`` (B, K) over
    the alignment's columns."""
    count = min(INSERT_CLASSES, weights.shape[1])
    top = np.argpartition(-weights, count - 1, axis=1)[:, :count]  # (B, count) most probable columns
    kept = np.take_along_axis(weights, top, axis=1)
    kept = np.where(kept >= MIN_INSERT_WEIGHT, kept, 0.0)
    kept *= weights.sum(axis=1, keepdims=True) / np.maximum(kept.sum(axis=1, keepdims=True), 1e-300)
    rows, slots = np.nonzero(kept)
    columns = top[rows, slots]
    classes = columns if alignment.classes is None else alignment.classes[rows, columns].astype(np.int64)
    pair_weight = kept[rows, slots]
    angle = alignment.angle_deg[rows, columns]
    shift = alignment.shift_px[rows, columns]
    if alignment.pose_weight is None:
        return rows, classes, angle, shift, pair_weight
    # Marginalised: a candidate pair inserts its top poses, weighted by their posteriors.
    slot = np.full(rows.size, -1)
    matches = alignment.candidates[rows] == classes[:, None]  # (M, Kc)
    has = matches.any(axis=1)
    slot[has] = np.argmax(matches[has], axis=1)
    plain = ~has
    spread = np.flatnonzero(has)
    pose_rows, pose_slots = rows[spread], slot[spread]
    count = alignment.pose_weight.shape[2]
    return (
        np.concatenate([rows[plain], np.repeat(pose_rows, count)]),
        np.concatenate([classes[plain], np.repeat(classes[spread], count)]),
        np.concatenate([angle[plain], alignment.pose_angle_deg[pose_rows, pose_slots].ravel()]),
        np.concatenate([shift[plain], alignment.pose_shift_px[pose_rows, pose_slots].reshape(-1, 2)]),
        np.concatenate([
            pair_weight[plain],
            (pair_weight[spread, None] * alignment.pose_weight[pose_rows, pose_slots]).ravel(),
        ]),
    )
