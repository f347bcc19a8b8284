"""Ab-initio reconstruction of K volumes from particle images alone (SPEC §5.2).

Model. Particle ``i`` is ``X_i = CTF_i · P(V_k, A)`` shifted by ``s``, plus noise, for one class ``k``, one pose
``A`` on a near-uniform SO(3) grid and one shift ``s`` on a grid, with Gaussian noise whose power ``σ²(ν)``
depends only on the spatial frequency. The MAP objective is ``Σ_i log Σ_{k,A,s} π_k p(X_i | V_k, A, s) + log p(V)``
with a Gaussian prior on the Fourier coefficients of each ``V_k`` whose power ``τ²(ν)`` comes from the FSC of two
half-sets (SPEC §4, ``T = 4``).

Optimiser. Stochastic approximation on minibatches (online EM, the "VDAM-like" scheme of the issue): each
iteration scores a random minibatch against every class × SO(3) grid rotation × shift, marginalising over all of
them with the CTF and the noise model; it forms the posterior-weighted back-projections of the data
``Σ w·CTF·X/σ²`` and of its curvature ``Σ w·CTF²/σ²`` per class and moves running averages of both towards them by
the learning rate ``η_t``. Each class volume is the Wiener/MAP solution of its averaged statistics, so a step is a
preconditioned gradient step on the MAP objective, the preconditioner being the running curvature; at ``η = 1``
it jumps to the minibatch's own MAP volume. ``η_t`` stays at ``learning_rate_initial`` for the first half of the
initial iterations, then decays as ``1 / t`` to the averaging regime, never below ``minibatch / N`` (an epoch).

Before each E-step the class volumes are constrained in real space, as cryoSPARC does: a soft spherical window,
non-negativity above the solvent level and re-centring on the centre of mass. The constraints shape the templates
only; the running statistics stay those of the data.

Schedules. Over the ``initial_iterations`` the minibatch grows from ``minibatch_size_initial`` to
``minibatch_size_final`` and the resolution marches linearly in spatial frequency from ``initial_resolution_a``
to ``max_resolution_a``; the ``final_iterations`` run at the final values. Class similarity ``s`` mixes every
particle's class posteriors with the uniform distribution, ``(1 - s)·γ_k + s / K``, so that every class sees a
share of every particle and none collapses before the classes have differentiated; it stays at
``class_similarity_initial`` until 60% of all iterations and anneals to ``class_similarity_final`` by 70%.

Noise model and temperature. ``σ²`` per shell is a running average of the residual power at each particle's best
pose with a memory of :data:`_NOISE_MEMORY_IMAGES` images (or a tenth of the run's particle visits, when that is
fewer, so that a short run still reaches its data's noise level). It starts from the images' own power spectrum scaled
by a factor chosen on the first minibatch so that about :data:`_TARGET_ESS_FRACTION` of all poses carry
significant posterior weight (cryoSPARC's target effective sample size); as residuals replace the inflated start,
the posteriors sharpen, an annealing that needs no schedule.

Pose search. The core's global search per class (:class:`cryostack.core.search.PoseSearch`): coarse to fine
on the whole SO(3) grid (level 1 or 2, 30° or 15°, chosen from the resolution), in the final pass refined on the
next grid level; a particle's posteriors never depend on the other particles of its batch.

Initial volumes. Class ``k`` starts from the reconstruction of its own random subset of particles at uniformly
random poses (a seeded draw): a blob of the right size and grey scale with a little random structure.

Final pass. After the last iteration every particle is scored at the maximum resolution with the refined search;
its class posteriors, best pose and shift are reported, and each class volume is reconstructed from all
particles' posteriors with the Wiener filter of the FSC between two random half-sets, so the volumes are on the
grey scale of the data and refinement can start from them without rescaling.

Working box. Only coefficients inside the maximum resolution (plus a taper) are ever used
(:mod:`cryostack.core.spectra`); the volumes live on the Fourier-cropped working box ``D_w`` and output volumes
are Fourier-padded back to the particles' box ``D``.

Randomness. Every draw comes from a generator seeded by ``(seed, purpose, iteration)``, so a run resumed from a
checkpoint of its state continues exactly as the uninterrupted run.

Backends. A run computes where its particles' coefficients live (:func:`collect_spectra` puts them in numpy or
cupy): the coefficients, the running sums, the volumes, the scoring, projection and back-projection stay on that
device; the bookkeeping that decides what to score (minibatches, candidate rotations, shift lattices, class
posteriors, the noise spectrum) is small and stays on the host. Checkpoints and results are host arrays.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from cryostack.core.backend import array_module, to_host
from cryostack.core.fourier import fft3_centered, fourier_pad_3d, resolution_to_shell
from cryostack.core.fsc import resolution_at_threshold
from cryostack.core.geometry import uniform_random_rotations
from cryostack.core.masks import soft_spherical_mask
from cryostack.core.numerics import log_sum_exp, seed_sequence, softmax
from cryostack.core.poses import shift_step_px, so3_grid_matrices, so3_level_for_step
from cryostack.core.projection import FourierAccumulator, Projector
from cryostack.core.reconstruction import half_set_fsc_from_sums, wiener_from_half_sums
from cryostack.core.scoring import log_likelihoods
from cryostack.core.search import ClassPosteriors, PoseSearch, shift_lattice
from cryostack.core.spectra import TAPER_SHELLS, ParticleBatch, ParticleSpectra
from cryostack.services.abinitio.constraints import constrain, real_space_masks
from cryostack.services.abinitio.parameters import AbinitioParameters
from cryostack.services.abinitio.state import AbinitioResult, AbinitioState, IterationReport

# Streams of the job's seed, one per purpose, so that draws for one purpose never shift another's.
_STREAM_INIT = 1
_STREAM_MINIBATCH = 2
_STREAM_HALVES = 3

# Fraction of the box diameter the particle is assumed to span when sizing the angular sampling.
_PARTICLE_DIAMETER_FRACTION = 0.6
# Levels of the global SO(3) search during the iterations (level 1: 30°, level 2: 15°).
_MIN_SEARCH_LEVEL = 1
_MAX_SEARCH_LEVEL = 2
# Particles per chunk of the final pass. Results do not depend on it; a chunk projects and back-projects the union
# of its particles' rotations once, so larger chunks share more of them (3,000 particles in chunks of 500, 1,500
# and 3,000: 21.8, 14.3 and 9.4 s) at the cost of holding that union's templates (~C·8 bytes each, per class).
_FINAL_CHUNK = 1500
# Memory of the running noise estimate, in images (cryoSPARC's "noise initw"), at most this fraction of the run.
_NOISE_MEMORY_IMAGES = 5000.0
_NOISE_MEMORY_FRACTION = 0.1
# Fraction of all poses that should carry significant weight at the first iteration (cryoSPARC's 0.011).
_TARGET_ESS_FRACTION = 0.011
# Running-average rate of the class occupancy.
_PRIOR_RATE = 0.1
# Class similarity holds until this fraction of all iterations and reaches its final value at the second.
_SIMILARITY_ANNEAL = (0.6, 0.7)
# Iterations between re-measurements of the running half-set FSC.
_FSC_EVERY = 5


class AbinitioRun:
    """One ab-initio run over a particle set: :meth:`step` through the iterations, then :meth:`finish`."""

    def __init__(self, spectra: ParticleSpectra, params: AbinitioParameters, seed: int,
                 state: AbinitioState | None = None) -> None:
        """Start a run (fresh random initial volumes) or continue one from ``state`` (a checkpoint)."""
        params.check(spectra.n_particles, spectra.layout.pixel_size_a)
        self.xp = array_module(spectra.coefficients)
        self.spectra = spectra
        self.params = params
        self.seed = int(seed)
        self.layout = spectra.layout
        self.working_box = self.layout.working_box_px
        self.padded_box = 2 * self.working_box
        self.search = PoseSearch(self.layout, self.xp)
        self.flat_working = self.search.flat_working  # (C,) into the D_w grid
        self.max_shift_px = 0.1 * self.layout.box_px if params.max_shift_px is None else params.max_shift_px
        halves = np.random.default_rng(self._seed_sequence(_STREAM_HALVES, 0))
        self.half_set = halves.integers(0, 2, spectra.n_particles)  # (N,) 0 or 1
        self._window, self._solvent = real_space_masks(self.working_box, self.xp)
        visits = sum(self.minibatch_size_at(i) for i in range(params.total_iterations))
        self.noise_memory = min(_NOISE_MEMORY_IMAGES, _NOISE_MEMORY_FRACTION * visits)
        if state is None:
            self.state = self._initial_state()
            self._volumes = self._current_volumes(refresh_fsc=True)
            self._calibrate_noise()
        else:
            self.state = replace(state, data=self.xp.asarray(state.data), weight=self.xp.asarray(state.weight))
            self._volumes = self._current_volumes(refresh_fsc=False)

    # ----------------------------------------------------------------------------------------------- schedules

    def _seed_sequence(self, stream: int, iteration: int) -> np.random.SeedSequence:
        return seed_sequence(self.seed, stream, iteration)

    def _batch(self, rows: np.ndarray) -> ParticleBatch:
        return self.spectra.batch(rows, self.half_set)

    def _marching(self, iteration: int) -> float:
        """Fraction of the initial (marching) iterations done before ``iteration`` (0-based), in [0, 1]."""
        if self.params.initial_iterations <= 1:
            return 1.0
        return min(iteration / (self.params.initial_iterations - 1), 1.0)

    def resolution_at(self, iteration: int) -> float:
        """Resolution (Å) of an iteration: linear in spatial frequency over the initial iterations."""
        f = self._marching(iteration)
        p = self.params
        return 1.0 / ((1 - f) / p.initial_resolution_a + f / p.max_resolution_a)

    def minibatch_size_at(self, iteration: int) -> int:
        """Minibatch size of an iteration (at most the particle count)."""
        p = self.params
        growth = (p.minibatch_size_final - p.minibatch_size_initial) * self._marching(iteration)
        size = p.minibatch_size_initial + growth
        return int(min(round(size), self.spectra.n_particles))

    def class_similarity_at(self, iteration: int) -> float:
        """Class similarity of an iteration: held, then annealed linearly (see the module docstring)."""
        p = self.params
        start, end = (f * p.total_iterations for f in _SIMILARITY_ANNEAL)
        f = min(max((iteration - start) / max(end - start, 1.0), 0.0), 1.0)
        return p.class_similarity_initial + (p.class_similarity_final - p.class_similarity_initial) * f

    def learning_rate_at(self, iteration: int, minibatch: int) -> float:
        """Learning rate: ``η0`` for half the initial iterations, then ``η0 · t_h / t``, at least ``minibatch / N``."""
        hold = max(1.0, 0.5 * self.params.initial_iterations)
        rate = self.params.learning_rate_initial * min(1.0, hold / max(iteration + 1, 1))
        return float(min(1.0, max(rate, minibatch / self.spectra.n_particles)))

    def so3_level_at(self, resolution_a: float) -> int:
        """Level of the global search: a step that moves the particle's rim by about the resolution."""
        diameter_a = _PARTICLE_DIAMETER_FRACTION * self.layout.box_px * self.layout.pixel_size_a
        step_deg = math.degrees(2.0 * resolution_a / diameter_a)
        return int(min(max(so3_level_for_step(step_deg), _MIN_SEARCH_LEVEL), _MAX_SEARCH_LEVEL))

    # ------------------------------------------------------------------------------------------------ volumes

    def _initial_state(self) -> AbinitioState:
        """Random initial volumes: each class from its own random subset at uniformly random poses."""
        xp, k_count, p = self.xp, self.params.class_count, self.padded_box
        n_shells = self.layout.n_shells
        power = self.spectra.power[:n_shells].astype(np.float64)
        state = AbinitioState(
            iteration=0,
            data=xp.zeros((k_count, 2, p, p, p), dtype=np.complex64),
            weight=xp.zeros((k_count, 2, p, p, p), dtype=np.float32),
            noise_sum=self.noise_memory * power,
            noise_weight=np.full(n_shells, self.noise_memory),
            class_mass=np.full(k_count, 1.0 / k_count),
            fsc=np.zeros((k_count, n_shells)),
        )
        rng = np.random.default_rng(self._seed_sequence(_STREAM_INIT, 0))
        count = self.layout.count_within(self.params.initial_resolution_a)
        size = min(self.spectra.n_particles, max(self.params.minibatch_size_initial, 2))
        inv_var = xp.asarray((1.0 / power[self.layout.shell[:count]]).astype(np.float32))
        for k in range(k_count):
            rows = np.sort(rng.choice(self.spectra.n_particles, size=size, replace=False))
            rotations = uniform_random_rotations(size, rng)  # (n, 3, 3)
            x, ctf = self.search.particle_terms(self._batch(rows), count, None)  # (n, C), (n, C)
            for half in (0, 1):
                take = self.half_set[rows] == half
                on_device = xp.asarray(take)
                accumulator = FourierAccumulator(self.working_box, xp=xp)
                accumulator.insert((x * ctf * inv_var)[on_device], rotations[take],
                                   (ctf * ctf * inv_var)[on_device], coefficients=self.flat_working[:count])
                data, weight = accumulator.padded_sums()
                state.data[k, half] = data / size
                state.weight[k, half] = weight / size
        return state

    def _calibrate_noise(self) -> None:
        """Scale the starting noise power so the first minibatch's posteriors reach the target ESS fraction."""
        rows = np.sort(
            np.random.default_rng(self._seed_sequence(_STREAM_MINIBATCH, 0)).choice(
                self.spectra.n_particles, size=self.minibatch_size_at(0), replace=False
            )
        )
        resolution = self.resolution_at(0)
        count = self.layout.count_within(resolution)
        shifts = shift_lattice(shift_step_px(resolution, self.layout.pixel_size_a), self.max_shift_px)
        rotations = so3_grid_matrices(self.so3_level_at(resolution))
        templates = Projector(self._volumes[0]).project(rotations, coefficients=self.flat_working[:count])
        x, ctf = self.search.particle_terms(self._batch(rows), count, None)
        noise_var = self.search.noise_variance(self.state.noise_power, count)
        ramps = self.search.shift_ramps(shifts, count)
        # One block of log-likelihoods (n, S, M); a temperature T scales every σ² by T.
        ll = to_host(log_likelihoods(x, templates, ctf=ctf, noise_var=noise_var, shift_ramps=ramps))
        ll = ll.reshape(rows.size, -1).astype(np.float64)
        ll -= ll.max(axis=1, keepdims=True)
        target = _TARGET_ESS_FRACTION * ll.shape[1]

        def ess(temperature: float) -> float:
            p = np.exp(ll / temperature)
            return float(np.mean(p.sum(axis=1) ** 2 / (p * p).sum(axis=1)))

        low, high = 0.0, math.log(1e6)  # bisection on log T over [1, 1e6]
        if ess(1.0) >= target:
            return
        for _ in range(40):
            mid = 0.5 * (low + high)
            if ess(math.exp(mid)) < target:
                low = mid
            else:
                high = mid
        self.state.noise_sum = self.state.noise_sum * math.exp(high)

    def _current_volumes(self, refresh_fsc: bool) -> np.ndarray:
        """Constrained MAP volumes of the running statistics on the working box: (K, D_w, D_w, D_w) float32.

        The half-set FSC that sets the Wiener filter changes slowly; it is re-measured when ``refresh_fsc``.
        """
        k_count = self.params.class_count
        volumes = self.xp.empty((k_count,) + (self.working_box,) * 3, dtype=np.float32)
        for k in range(k_count):
            if refresh_fsc:
                self.state.fsc[k] = self._half_set_fsc(self.state.data[k], self.state.weight[k])
            merged = self._wiener(self.state.data[k], self.state.weight[k], self.state.fsc[k])
            volumes[k] = constrain(merged, self._window, self._solvent)
        return volumes

    def _half_set_fsc(self, data: Any, weight: Any) -> np.ndarray:
        """FSC (n_shells,) of the plainly regularised half-set maps of sums (2, P, P, P)."""
        return half_set_fsc_from_sums(data, weight, self.working_box)

    def _wiener(self, data: Any, weight: Any, fsc: np.ndarray) -> Any:
        """Wiener map (D_w³) of both half-sets' sums (2, P, P, P), filtered with the full-data FSC of ``fsc``."""
        return wiener_from_half_sums(data, weight, self.working_box, fsc)

    def half_map_resolution_a(self) -> np.ndarray:
        """FSC-0.143 resolution (Å) of each class's running half-set maps: (K,)."""
        pixel = self.layout.working_pixel_size_a
        return np.array([resolution_at_threshold(f, self.working_box, pixel, 0.143) for f in self.state.fsc])

    # ---------------------------------------------------------------------------------------------- iteration

    @property
    def done(self) -> bool:
        """True once every iteration has run."""
        return self.state.iteration >= self.params.total_iterations

    def step(self) -> IterationReport:
        """Run the next iteration on a fresh minibatch and return its report."""
        it = self.state.iteration
        p = self.params
        resolution = self.resolution_at(it)
        size = self.minibatch_size_at(it)
        rate = self.learning_rate_at(it, size)
        similarity = self.class_similarity_at(it)
        level = self.so3_level_at(resolution)
        rng = np.random.default_rng(self._seed_sequence(_STREAM_MINIBATCH, it))
        rows = np.sort(rng.choice(self.spectra.n_particles, size=size, replace=False))

        search = self._search(rows, resolution, level)
        log_evidence = np.stack([s.log_evidence for s in search], axis=1)  # (n, K)
        posteriors = softmax(log_evidence + self.state.log_prior[None, :])  # (n, K)
        mixed = (1.0 - similarity) * posteriors + similarity / p.class_count
        data, weight = self._back_project(rows, search, mixed)
        self.state.data = (1 - rate) * self.state.data + (rate / size) * data
        self.state.weight = (1 - rate) * self.state.weight + (rate / size) * weight
        self._update_noise(rows, search, posteriors)
        self.state.class_mass = (1 - _PRIOR_RATE) * self.state.class_mass + _PRIOR_RATE * posteriors.mean(axis=0)
        self.state.iteration = it + 1
        self._volumes = self._current_volumes(refresh_fsc=self.state.iteration % _FSC_EVERY == 0)

        evidence = log_sum_exp(log_evidence + self.state.log_prior[None, :], axis=1)
        return IterationReport(
            iteration=it + 1,
            total_iterations=p.total_iterations,
            resolution_a=resolution,
            minibatch_size=size,
            learning_rate=rate,
            class_similarity=similarity,
            so3_level=level,
            class_fractions=self.state.class_mass.copy(),
            objective=float(evidence.mean() / search[0].count),
            half_map_resolution_a=self.half_map_resolution_a(),
        )

    # ------------------------------------------------------------------------------------------------- E-step

    # ------------------------------------------------------------------------------------------ E- and M-step

    def _search(self, rows: np.ndarray, resolution_a: float, level: int, refine: bool = False
                ) -> list[ClassPosteriors]:
        """Posteriors of particles ``rows`` over every class's rotations and shifts (the core's global search)."""
        batch = self._batch(rows)
        return [self.search.global_search(batch, volume, self.state.noise_power, resolution_a, level,
                                          self.max_shift_px, refine=refine) for volume in self._volumes]

    def _back_project(self, rows: np.ndarray, search: list[ClassPosteriors], class_weights: np.ndarray
                      ) -> tuple[Any, Any]:
        """Per class and half-set, the sums (K, 2, P, P, P) of the batch's poses weighted by ``class_weights``."""
        return self.search.back_project(self._batch(rows), search, class_weights, self.state.noise_power)

    def _update_noise(self, rows: np.ndarray, search: list[ClassPosteriors], posteriors: np.ndarray) -> None:
        """Fold the residual power at each particle's best class and pose into the running σ² per shell."""
        n = rows.size
        count = search[0].count
        residual_power = self.search.residual_power(self._batch(rows), search, np.argmax(posteriors, axis=1),
                                                    self._volumes)
        counts = self.layout.shell_count(count)
        covered = counts > 0
        decay = max(0.0, 1.0 - n / self.noise_memory)
        measured = self.layout.shell_sum(to_host(residual_power)) / np.maximum(counts, 1)  # Σ over images, per coef.
        self.state.noise_sum[covered] = decay * self.state.noise_sum[covered] + measured[covered]
        self.state.noise_weight[covered] = decay * self.state.noise_weight[covered] + n

    # ---------------------------------------------------------------------------------------------- final pass

    def finish(self, chunk_size: int = _FINAL_CHUNK, progress: Callable[[float], None] | None = None,
               refine: bool = True) -> AbinitioResult:
        """Score every particle at the maximum resolution and reconstruct the final volumes from all of them."""
        resolution = self.params.max_resolution_a
        n_total = self.spectra.n_particles
        level = self.so3_level_at(resolution)
        posteriors = np.zeros((n_total, self.params.class_count), dtype=np.float32)
        rotations = np.zeros((n_total, 3, 3))
        shifts = np.zeros((n_total, 2), dtype=np.float32)
        data = weight = None
        for start in range(0, n_total, chunk_size):
            rows = np.arange(start, min(start + chunk_size, n_total))
            search = self._search(rows, resolution, level, refine=refine)
            post = softmax(np.stack([s.log_evidence for s in search], axis=1) + self.state.log_prior[None, :])
            posteriors[rows] = post
            best = np.argmax(post, axis=1)
            for k, s in enumerate(search):
                members = np.flatnonzero(best == k)
                rotations[rows[members]] = s.rotations[s.best_template[members]]
                shifts[rows[members]] = s.centre_px[members] + s.shifts_px[s.best_shift[members]]
            batch_data, batch_weight = self._back_project(rows, search, post)
            data = batch_data if data is None else data + batch_data
            weight = batch_weight if weight is None else weight + batch_weight
            if progress is not None:
                progress((rows[-1] + 1) / n_total)
        assert data is not None and weight is not None
        volumes, fscs = self._final_volumes(data, weight)
        pixel = self.layout.working_pixel_size_a
        return AbinitioResult(
            volumes=volumes,
            class_posteriors=posteriors,
            rotations=rotations,
            shift_px=shifts,
            half_map_fsc=fscs,
            resolution_a=np.array([resolution_at_threshold(f, self.working_box, pixel, 0.143) for f in fscs]),
            final_resolution_a=resolution,
            pixel_size_a=self.layout.pixel_size_a,
        )

    def _final_volumes(self, data: Any, weight: Any) -> tuple[np.ndarray, np.ndarray]:
        """Host Wiener volumes (K, D, D, D) from half-set sums (K, 2, P, P, P), and their half-set FSCs (K, shells)."""
        box = self.layout.box_px
        out = np.empty((data.shape[0], box, box, box), dtype=np.float32)
        fscs = np.empty((data.shape[0], self.layout.n_shells))
        taper = soft_spherical_mask(
            self.working_box,
            resolution_to_shell(self.layout.box_px, self.layout.pixel_size_a, self.params.max_resolution_a),
            TAPER_SHELLS,
            self.xp,
        )
        for k in range(data.shape[0]):
            fscs[k] = self._half_set_fsc(data[k], weight[k])
            merged = self._wiener(data[k], weight[k], fscs[k])
            out[k] = to_host(fourier_pad_3d(fft3_centered(merged) * taper, box))
        return out, fscs
