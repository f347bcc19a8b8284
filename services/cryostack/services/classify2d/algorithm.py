"""2D classification by expectation–maximisation over K classes × in-plane rotations × shifts (SPEC §5.1).

Model. Particle ``i`` is ``X_i = CTF_i · shift_s(rotate_A(T_k)) + noise``: the class average ``T_k`` rotated by an
in-plane matrix ``A`` (:func:`cryostack.core.geometry.rotation_matrix_2d` of ψ, RELION's ``rlnAnglePsi``; the
template is read off at ``Aᵀk`` as in :class:`cryostack.core.projection.Projector2D`), translated by ``s`` pixels
(``rlnOriginXAngst = −s_x · pixel size``), multiplied by its CTF, with Gaussian noise of power ``σ²(ν)`` per
Fourier shell. Scoring uses the half-plane of Fourier coefficients inside the current resolution limit (DC left
out, each coefficient standing for itself and its Friedel mate), sorted by frequency so that any resolution limit
is a prefix of one list.

Pose search (each iteration, every particle against every class). A coarse global search on a low-resolution
prefix of the coefficients (at most :data:`.search.COARSE_SHELLS` shells) over an in-plane angle grid and a shift
grid sized to that resolution (:mod:`cryostack.core.poses`), scored by the shared kernel
(:func:`cryostack.core.scoring.iter_log_likelihoods`) as dense matrix products; then, for each particle's
:data:`.search.CANDIDATE_CLASSES` best classes, a local search at the current resolution on angle and shift grids
refined to it, around the coarse optimum. A class's log-likelihood is the best local score ("force max") or the local
log-sum-exp over poses (marginalised); the other classes keep their coarse score, moved onto the fine scale by the
particle's offset between fine and coarse scores of its last candidate.

E-step. Class responsibilities are the softmax of log-likelihoods divided by the classification uncertainty
factor (a temperature, annealed linearly from its initial value to 1 over the online iterations). With a
``max_particles_per_class`` cap they are instead scaled with upper-bounded class marginals (Sinkhorn–Knopp on a
minibatch, :func:`cryostack.core.capacity.capped_responsibilities`; the same scaling by its dual over a whole
pass, :func:`~cryostack.core.capacity.class_responsibilities`): each class's expected occupancy stays within its
capacity, which is the cap scaled to the minibatch (``cap · B / N``) in online iterations and the full cap in full
passes. The last full iteration assigns every particle to exactly one class, by the exact capacitated assignment
(:func:`~cryostack.core.capacity.capped_assignment_with_rescoring`) when capped, and reconstructs the classes from
those hard assignments, so reported counts, class averages and ``particles.star`` agree and no class exceeds the
cap. Full passes keep only each particle's :data:`PASS_KEPT_CLASSES` best classes with their poses (memory grows
with N, not N·K); both kinds of pass score again against every class the particles the cap would push beyond their
kept classes, so a soft pass inserts what it would have with all K (to within :data:`.mstep.MIN_INSERT_WEIGHT` of a
particle) and the final assignment stays exact over all K.

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
classes of the FRC-0.143 resolution; scoring runs :data:`.search.RESOLUTION_MARGIN_SHELLS` shells beyond it, starting at
:data:`.mstep.INITIAL_RESOLUTION_A`, and never beyond ``max_resolution_a`` (unset: 6 Å, or Nyquist if coarser).

Initial classes are CTF-corrected averages of random particle subsets at random in-plane rotations. Everything
random is drawn from generators seeded by ``(seed, purpose, iteration)``, so a run resumed from the state saved
after any iteration ends exactly as an uninterrupted run.

Backends. Each batch is transformed, CTF-evaluated, scored and inserted in the classifier's array module (numpy,
or cupy on a GPU); what carries from one iteration to the next (class averages, running sums, noise, the
per-particle tables of a full pass) and the small bookkeeping between the searches (candidate classes, pose
indices, the capped E-step) stay on the host.

Layout. This module drives the iterations and the E-step (:class:`Classifier2D`); :mod:`.parameters` holds the
parameters and their validation, :mod:`.state` what carries between iterations and the result, :mod:`.search` the
pose search, :mod:`.mstep` insertion and class averages; the capped assignment is :mod:`cryostack.core.capacity`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import replace
from types import ModuleType

import numpy as np

from cryostack.core.backend import to_host
from cryostack.core.capacity import (
    ClassScores,
    batch_capacity,
    capped_assignment_with_rescoring,
    capped_responsibilities,
    class_responsibilities,
)
from cryostack.core.ctf import CtfParameters
from cryostack.core.fourier import centered_coefficients_2d, n_shells
from cryostack.core.fsc import HALF_MAP_THRESHOLD, resolution_at_threshold
from cryostack.core.geometry import rotation_matrix_2d
from cryostack.core.masks import soft_circular_mask
from cryostack.core.noise import noise_power_from_background
from cryostack.core.numerics import random_stream, softmax
from cryostack.core.reconstruction import Reconstructor2D
from cryostack.core.sources import ParticleSource
from cryostack.services.classify2d.mstep import INITIAL_RESOLUTION_A, MIN_INSERT_WEIGHT, MStep
from cryostack.services.classify2d.parameters import Classify2DParameters, validate_parameters
from cryostack.services.classify2d.search import Alignment, Batch, PoseSearch, SearchPlan, half_plane_coefficients
from cryostack.services.classify2d.state import (
    ClassificationResult,
    ClassificationState,
    FinalAssignment,
    IterationReport,
)

logger = logging.getLogger(__name__)

# Classes per particle a full pass keeps (best first), so that its tables grow with N, not N·K; at least
# INSERT_CLASSES. Particles a cap would push beyond their list are scored again against every class.
PASS_KEPT_CLASSES = 16
# Floor of the online-EM step size: the running sums remember about 1 / ETA_MIN minibatches.
ETA_MIN = 0.3
# With a cap, during the online iterations but the last REBALANCE_SETTLE_ITERATIONS, the class whose uncapped demand
# most exceeds the cap is split into the least occupied class when that one holds under REBALANCE_UNDERUSE · N/K (one
# split per iteration: splitting every such pair at once churns the classes, and purity drops).
REBALANCE_UNDERUSE = 0.75
REBALANCE_SETTLE_ITERATIONS = 4
# Particles sampled for the initial noise spectrum, and per initial class.
NOISE_SAMPLE = 1000
INITIAL_SUBSET = 20
# Particles a pass scores and inserts at a time (memory bound).
PASS_BATCH = 1000

# Purposes of the seeded random streams.
_STREAM_BATCH, _STREAM_NOISE, _STREAM_INIT, _STREAM_HALVES = 1, 2, 3, 4


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
        inner_px, outer_px = inner_a / 2 / self.pixel_size_a, outer_a / 2 / self.pixel_size_a
        self.mask = soft_circular_mask(self.box_px, inner_px, outer_px - inner_px)  # (D, D) float32
        self.mask_radius_px = inner_px
        self.search = PoseSearch(params, self.coefficients, self.box_px, self.pixel_size_a, inner_a, xp)
        self.mstep = MStep(params, self.coefficients, self.box_px, self.pixel_size_a, self.mask, xp)
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
        plan = self.search.plan(state.resolution_a)
        batch = self._prepare(rows, self.particles.read(rows), plan.fine_count)
        scorer = self._scorer(state, plan, iteration)
        alignment = scorer(batch)
        temperature = self.temperature(iteration)
        responsibilities = self._responsibilities(alignment.class_ll / temperature, size)
        sums = self.mstep.accumulate([(batch, alignment, responsibilities)])
        eta = max(1.0 / (iteration + 1), ETA_MIN)
        occupancy = responsibilities.sum(axis=0) * (self.n_particles / size)
        state = self.mstep.update(state, sums, eta, occupancy, alignment, recenter=self.params.recenter_classes)
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
        plan = self.search.plan(state.resolution_a)
        scorer = self._scorer(state, plan, iteration)

        def aligned_batches() -> Iterator[tuple[np.ndarray, Alignment]]:
            """Each particle's best classes with their poses (a soft pass also keeps its candidates' marginal
            poses)."""
            for rows, images in self.particles.iter_batches(None, PASS_BATCH):
                if cancel is not None:
                    cancel()
                aligned = scorer(self._prepare(rows, images))
                yield rows, aligned.best_classes(PASS_KEPT_CLASSES, marginal_poses=not final)

        alignment = Alignment.gather(aligned_batches(), self.n_particles)
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
        state = self.mstep.update(
            state, sums, 1.0, occupancy, alignment, recenter=self.params.recenter_classes and not final
        )
        state.particles_seen += self.n_particles
        state.iteration = iteration + 1
        return state

    def _soft_assignment(
        self, alignment: Alignment, scorer: Callable[[Batch], Alignment]
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
        rescored: list[tuple[np.ndarray, Alignment]] = []
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
        self, alignment: Alignment, scorer: Callable[[Batch], Alignment]
    ) -> FinalAssignment:
        """Each particle's class from its best classes ``alignment`` (N, M): the argmax, or the exact capped
        assignment (particles it would send beyond their M are scored again against every class); its pose and
        probability."""
        n, k = self.n_particles, self.n_classes
        scores = ClassScores.from_columns(
            alignment.classes, alignment.class_ll, alignment.excluded_bound, alignment.excluded_log_mass, k
        )
        rescored: list[tuple[np.ndarray, Alignment]] = []

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

    def _score_every_class(self, scorer: Callable[[Batch], Alignment], rows: np.ndarray) -> Alignment:
        """Scores and poses of particles ``rows`` (V,), ascending, against every class: read and scored
        PASS_BATCH at a time, as a pass is."""
        parts = ((np.searchsorted(rows, chunk), scorer(self._prepare(chunk, images)))
                 for chunk, images in self.particles.iter_batches(rows, PASS_BATCH))
        return Alignment.gather(parts, rows.size)

    def _responsibilities(self, log_weights: np.ndarray, batch_size: int) -> np.ndarray:
        """Class responsibilities (B, K): the posterior, or the capped one when a cap is set."""
        if self.capacity is None:
            return softmax(log_weights, axis=1)
        capacity = batch_capacity(np.full(self.n_classes, float(self.capacity)), batch_size, self.n_particles)
        return capped_responsibilities(log_weights, capacity)

    def _pass_sums(
        self,
        alignment: Alignment,
        weights_of: Callable[[np.ndarray], np.ndarray],
        cancel: Callable[[], None] | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Read the set again and insert every particle with its class weights ``weights_of(rows)`` (B, K)."""
        reconstructors = self.mstep.reconstructors()
        for rows, images in self.particles.iter_batches(None, PASS_BATCH):
            if cancel is not None:
                cancel()
            self.mstep.insert(reconstructors, self._prepare(rows, images), alignment.take(rows), weights_of(rows))
        return self.mstep.padded_sums(reconstructors)

    # ------------------------------------------------------------------------------------ preparation

    def _prepare(self, rows: np.ndarray, images: np.ndarray, count: int | None = None) -> Batch:
        """Transforms and CTF of a batch of images (B, D, D) at the first ``count`` coefficients (None: all)."""
        kept = slice(0, count)
        coefficients = centered_coefficients_2d(self.xp.asarray(images), self.coefficients.flat[kept])  # (B, C)
        ctf = None if self.ctf is None else self.ctf.take(rows).at(self._fy[kept], self._fx[kept])
        return Batch(rows, coefficients, ctf, self.half[rows])

    def _scorer(self, state: ClassificationState, plan: SearchPlan, iteration: int) -> Callable[[Batch], Alignment]:
        """A function aligning batches against the current classes with the iteration's annealed noise."""
        noise_var = self.search.noise_variance(state.noise_power, self.sigma_annealing_weight(iteration),
                                               plan.fine_count)  # (C2 - 1,)
        return self.search.scorer(state.averages, plan, noise_var)

    # ------------------------------------------------------------------------------------- moving classes

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
            self.mstep.split(state, source, target)
        return state

    def _reseed(self, state: ClassificationState) -> ClassificationState:
        """Split the largest class into each class whose expected occupancy is below the threshold."""
        threshold = self.params.reseed_threshold()
        if threshold is None or state.iteration >= self.params.online_em_iterations:
            return state
        for starving in np.flatnonzero(state.occupancy < threshold):
            largest = int(np.argmax(state.occupancy))
            if largest == starving or state.occupancy[largest] < 2 * threshold:
                continue
            self.mstep.split(state, largest, starving)
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


def _full_weight(rows: np.ndarray) -> np.ndarray:
    """Weights (B, 1): each particle of ``rows`` wholly in the one class its alignment lists."""
    return np.ones((rows.size, 1))
