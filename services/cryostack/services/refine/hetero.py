"""Heterogeneous refinement: K volumes and all particles, multi-class EM with full pose search (SPEC §5.3).

Model. Particle ``i`` is ``CTF_i · P(V_k, A)`` shifted by ``s`` plus Gaussian noise of power ``σ²(ν)`` per shell,
for one class ``k``; class ``k`` has prior ``π_k``. Each class's pose search is the core's global search
(:class:`cryostack.core.search.PoseSearch`, coarse to fine on the SO(3) grid × shifts), marginalised; a particle's
class posterior is the softmax of its per-class log-evidence plus the log prior.

Schedule (cryoSPARC's). The input volumes are low-passed to ``initial_resolution_a``. Online EM: each iteration
scores a minibatch of ``batch_size_per_class · K`` particles, drawn in a seeded random order epoch after epoch, and
moves running per-class half-set sums ``Σ w·CTF·X/σ²``, ``Σ w·CTF²/σ²`` towards the minibatch's by the rate
``max(1/t, n/N)`` (so that at steady state the sums average an epoch). In the first
``random_assignment_iterations`` each particle goes to a random class and is aligned to that class only, so every
class starts from a mixture and none can take all particles at once. Online EM ends when the share of particles
whose class changed since they were last scored falls below ``convergence_class_change_fraction`` (or after
``max_online_iterations``); then ``final_full_iterations`` passes over all particles rebuild the sums from scratch:
the first with the global search refined one grid level deeper, the next ones with a local search around each
particle's best pose whose steps halve at every pass (:func:`cryostack.services.refine.common.local_steps`).
Class volumes are the Wiener/MAP reconstruction of each class's sums with the FSC of its half-sets
(``rlnRandomSubset``: the split the input carries, or a fixed seeded one).

Resolution. The search scores the coefficients inside the resolution the largest class's half maps support
(FSC 0.143) plus a margin, never coarser than ``initial_resolution_a`` nor finer than ``max_resolution_a``.

Noise. ``σ²`` per shell starts from the power of the first minibatch's images and follows the residual power at
each particle's best class and pose: a running average of :data:`cryostack.services.refine.common.NOISE_MEMORY_IMAGES`
images during online EM, the whole pass in a full iteration.

Memory. Particles stream from the source batch by batch; the run keeps per particle its class posteriors, best
pose, shift and last class (``K·4 + 88`` bytes), the running sums ``K × 2 × (2 D_w)³`` and the volumes.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import numpy as np

from cryostack.core.ctf import CtfParameters
from cryostack.core.numerics import floored_log_prior, random_stream, softmax
from cryostack.core.reconstruction import half_set_fsc_from_sums, reconstruct_from_sums, wiener_from_half_sums
from cryostack.core.search import ClassPosteriors, PoseSearch
from cryostack.core.sources import ParticleSource
from cryostack.core.spectra import ParticleBatch, SpectralLayout
from cryostack.errors import InvalidArgumentError
from cryostack.services.refine import common
from cryostack.services.refine.parameters import HeteroParameters
from cryostack.services.refine.results import HeteroResult, RefineIterationReport

# Streams of the job's seed, one per purpose.
_STREAM_HALVES = 1
_STREAM_ORDER = 2
_STREAM_RANDOM_CLASS = 3
# Running-average rate of the class occupancy, and the floor of a class prior as a fraction of uniform.
_PRIOR_RATE = 0.2
_MIN_PRIOR_FRACTION = 0.05
# A class whose half-set holds fewer particles than this has no gold-standard resolution.
_MIN_HALF_PARTICLES = 2


@dataclass
class _State:
    """Everything a run carries from one iteration to the next (what a checkpoint stores)."""

    iteration: int  # iterations completed (online and full)
    full_done: int  # full iterations completed
    online_done: bool
    data: object  # (K, 2, P, P, P) complex64 running sums Σ w·CTF·X/σ² (run's device)
    weight: object  # (K, 2, P, P, P) float32 running sums Σ w·CTF²/σ²
    noise_sum: np.ndarray  # (n_shells,) float64 running Σ residual power per coefficient over images
    noise_weight: np.ndarray  # (n_shells,) float64 images behind ``noise_sum``
    class_mass: np.ndarray  # (K,) running class occupancy
    fsc: np.ndarray  # (K, n_shells) half-map FSC of each class (working box)
    resolution_a: float  # resolution the next iteration searches to
    last_class: np.ndarray  # (N,) int64 class when last scored by an E-step, -1 never (random iterations: -1)
    posteriors: np.ndarray  # (N, K) float32 of the last E-step that scored each particle
    rotations: np.ndarray  # (N, 3, 3) float64 best pose in its best class
    shift_px: np.ndarray  # (N, 2) float32
    class_change_fraction: float
    epoch_order: np.ndarray  # (N,) int64 the current epoch's random order
    cursor: int  # position in ``epoch_order`` of the next minibatch
    epoch: int

    def to_bytes(self) -> bytes:
        return common.arrays_to_bytes(**{name: getattr(self, name) for name in self.__dataclass_fields__})

    @classmethod
    def from_bytes(cls, payload: bytes, xp: ModuleType) -> _State:
        z = common.arrays_from_bytes(payload)
        values = {name: z[name] for name in cls.__dataclass_fields__}
        for name in ("iteration", "full_done", "cursor", "epoch"):
            values[name] = int(values[name])
        values["online_done"] = bool(values["online_done"])
        values["resolution_a"] = float(values["resolution_a"])
        values["class_change_fraction"] = float(values["class_change_fraction"])
        values["data"], values["weight"] = xp.asarray(values["data"]), xp.asarray(values["weight"])
        return cls(**values)

    @property
    def noise_power(self) -> np.ndarray:
        """σ² per shell of the working box: (n_shells,) float64."""
        return self.noise_sum / self.noise_weight

    @property
    def log_prior(self) -> np.ndarray:
        """Class log-priors from the running occupancy, each at least a fraction of uniform: (K,)."""
        return floored_log_prior(self.class_mass, _MIN_PRIOR_FRACTION)


class HeterogeneousRefinement:
    """One heterogeneous refinement: :meth:`step` until :attr:`done`, then :meth:`finish`."""

    def __init__(self, particles: ParticleSource, ctf: CtfParameters, volumes: np.ndarray, pixel_size_a: float,
                 params: HeteroParameters, seed: int, state: bytes | None = None, xp: ModuleType = np, *,
                 half_set: np.ndarray | None = None) -> None:
        """Start a run from ``volumes`` (K, D, D, D), or continue one from ``state`` (a checkpoint's bytes).

        ``half_set`` (N,) 0 or 1 keeps a split the particles already have; without it one is drawn from the seed.
        """
        n_particles, box = len(particles), int(particles.box_px)
        volumes = np.asarray(volumes, dtype=np.float32)
        if volumes.ndim != 4 or volumes.shape[1:] != (box,) * 3:
            raise InvalidArgumentError("volumes", f"expected (K, {box}, {box}, {box}), got {volumes.shape}")
        params.check(n_particles, pixel_size_a, volumes.shape[0])
        self.particles, self.ctf, self.params, self.seed, self.xp = particles, ctf, params, int(seed), xp
        self.class_count = volumes.shape[0]
        self.finest_a = params.max_resolution_a or 2.0 * pixel_size_a
        self.layout = SpectralLayout.for_resolution(box, pixel_size_a, self.finest_a)
        self.search = PoseSearch(self.layout, xp)
        self.half_set = common.half_sets(half_set, n_particles, random_stream(self.seed, _STREAM_HALVES))
        self.minibatch = min(n_particles, params.batch_size_per_class * self.class_count)
        if state is None:
            self.state = self._initial_state()
            self._volumes = xp.stack([common.working_volume(v, self.layout, params.initial_resolution_a, xp)
                                      for v in volumes])  # (K, D_w, D_w, D_w)
        else:
            self.state = _State.from_bytes(state, xp)
            self._volumes = self._current_volumes()

    # ------------------------------------------------------------------------------------------------ state

    def _initial_state(self) -> _State:
        n, k = len(self.particles), self.class_count
        p = 2 * self.layout.working_box_px
        shells = self.layout.n_shells
        first = np.sort(random_stream(self.seed, _STREAM_ORDER, 0).permutation(n)[: self.minibatch])
        power = common.image_power(common.read_batch(self.particles, first, self.layout, self.ctf, self.half_set,
                                                     self.xp), self.layout)
        memory = min(common.NOISE_MEMORY_IMAGES, float(n))
        return _State(
            iteration=0, full_done=0, online_done=False,
            data=self.xp.zeros((k, 2, p, p, p), dtype=np.complex64),
            weight=self.xp.zeros((k, 2, p, p, p), dtype=np.float32),
            noise_sum=memory * power, noise_weight=np.full(shells, memory),
            class_mass=np.full(k, 1.0 / k), fsc=np.zeros((k, shells)),
            resolution_a=float(self.params.initial_resolution_a),
            last_class=np.full(n, -1, dtype=np.int64), posteriors=np.full((n, k), 1.0 / k, dtype=np.float32),
            rotations=np.tile(np.eye(3), (n, 1, 1)), shift_px=np.zeros((n, 2), dtype=np.float32),
            class_change_fraction=float("nan"),
            epoch_order=random_stream(self.seed, _STREAM_ORDER, 0).permutation(n), cursor=0, epoch=0,
        )

    def state_bytes(self) -> bytes:
        """The run's state as a checkpoint (``.npz``, no pickle)."""
        return self.state.to_bytes()

    @property
    def done(self) -> bool:
        """True once the final full iterations have run."""
        return self.state.full_done >= self.params.final_full_iterations

    def _current_volumes(self) -> object:
        """Each class's Wiener map of both half-sets (K, D_w, D_w, D_w), filtered with its full-data FSC.

        Both half-sets are aligned to the same class maps: with half the data per reference the classes of a
        small or noisy set separate less well (measured: ARI 0.55 instead of 0.86 on the test set). The half-map
        FSC is therefore optimistic; it only sets how far the search looks.
        """
        box = self.layout.working_box_px
        return self.xp.stack([wiener_from_half_sums(self.state.data[k], self.state.weight[k], box, self.state.fsc[k])
                              for k in range(self.class_count)])

    def _refresh(self) -> None:
        """Half-set FSCs, volumes and the next search resolution from the running sums."""
        box = self.layout.working_box_px
        for k in range(self.class_count):
            self.state.fsc[k] = half_set_fsc_from_sums(self.state.data[k], self.state.weight[k], box)
        self._volumes = self._current_volumes()
        largest = int(np.argmax(self.state.class_mass))
        self.state.resolution_a = common.next_resolution_a(self.layout, self.state.fsc[largest], self.finest_a,
                                                           self.params.initial_resolution_a)

    # ----------------------------------------------------------------------------------------------- E-step

    def _score(self, rows: np.ndarray, batch: ParticleBatch, only_class: np.ndarray | None, search: str
               ) -> tuple[list[ClassPosteriors | None], np.ndarray]:
        """Each class's posteriors of the batch of particles ``rows``, and the class posteriors (n, K).

        ``search`` is ``global``, ``refine`` (global, one grid level deeper) or ``local`` (around each particle's
        last best pose, with steps that halve at every full iteration). With ``only_class`` (n,) each particle is
        scored against that class only (random assignment).
        """
        n, k_count = batch.n_particles, self.class_count
        level = common.global_level(self.layout, self.state.resolution_a)
        shift = common.max_shift_px(self.layout)
        searches: list[ClassPosteriors | None] = []
        log_evidence = np.full((n, k_count), -np.inf)
        for k in range(k_count):
            members = np.arange(n) if only_class is None else np.flatnonzero(only_class == k)
            if members.size == 0:
                searches.append(None)
                continue
            sub = batch if only_class is None else common.sub_batch(batch, members, self.xp)
            if search == "local":
                angular, step = common.local_steps(self.layout, self.state.resolution_a, self.state.full_done - 1)
                post = self.search.local_search(
                    sub, self._volumes[k], self.state.noise_power, self.state.resolution_a,
                    self.state.rotations[rows[members]], self.state.shift_px[rows[members]], angular,
                    common.LOCAL_STEPS * angular, step, common.LOCAL_STEPS * step)
            else:
                post = self.search.global_search(sub, self._volumes[k], self.state.noise_power,
                                                 self.state.resolution_a, level, shift, refine=search == "refine")
            searches.append(post)
            log_evidence[members, k] = post.log_evidence
        if only_class is not None:
            posteriors = np.zeros((n, k_count))
            posteriors[np.arange(n), only_class] = 1.0
        else:
            posteriors = softmax(log_evidence + self.state.log_prior[None, :], axis=1)
        return searches, posteriors

    def _e_and_m(self, rows: np.ndarray, batch: ParticleBatch, only_class: np.ndarray | None, search: str
                 ) -> tuple[np.ndarray, object, object, object]:
        """Score a batch, one half-set at a time, and sum its reconstruction terms per class and half-set.

        Returns the class posteriors (n, K), the sums (K, 2, P, P, P) and the residual power (C,); records each
        particle's best pose and shift.
        """
        xp, n = self.xp, batch.n_particles
        p = 2 * self.layout.working_box_px
        data = xp.zeros((self.class_count, 2, p, p, p), dtype=np.complex64)
        weight = xp.zeros((self.class_count, 2, p, p, p), dtype=np.float32)
        residual = xp.zeros(self.layout.count_within(self.state.resolution_a))
        posteriors = np.zeros((n, self.class_count))
        for half in (0, 1):
            in_half = np.flatnonzero(batch.half_set == half)
            if in_half.size == 0:
                continue
            sub = common.sub_batch(batch, in_half, xp)
            assigned = None if only_class is None else only_class[in_half]
            searches, post = self._score(rows[in_half], sub, assigned, search)
            posteriors[in_half] = post
            best = np.argmax(post, axis=1)
            for k, search in enumerate(searches):
                if search is None:
                    continue
                members = np.arange(in_half.size) if assigned is None else np.flatnonzero(assigned == k)
                scored = sub if assigned is None else common.sub_batch(sub, members, xp)
                d, w = self.search.back_project(scored, [search], post[members, k:k + 1], self.state.noise_power)
                data[k] += d[0]
                weight[k] += w[0]
                winners = np.flatnonzero(best[members] == k)
                self.state.rotations[rows[in_half[members[winners]]]] = search.best_rotations[winners]
                self.state.shift_px[rows[in_half[members[winners]]]] = search.best_shift_px[winners]
                residual += self.search.residual_power(scored, [search], np.where(best[members] == k, 0, -1),
                                                       self._volumes[k:k + 1])
        return posteriors, data, weight, residual

    def _record(self, rows: np.ndarray, posteriors: np.ndarray, random: bool) -> float:
        """Store the batch's posteriors and classes; the share whose class changed since last scored (or NaN)."""
        best = np.argmax(posteriors, axis=1)
        previous = self.state.last_class[rows]
        seen = previous >= 0
        change = float(np.mean(previous[seen] != best[seen])) if seen.any() else float("nan")
        self.state.posteriors[rows] = posteriors.astype(np.float32)
        self.state.last_class[rows] = -1 if random else best
        return change

    def _fold_noise(self, residual: object, n_images: int, decay: float) -> None:
        count = self.layout.count_within(self.state.resolution_a)
        measured, covered = common.residual_shell_power(self.layout, residual, count)
        self.state.noise_sum[covered] = decay * self.state.noise_sum[covered] + measured[covered]
        self.state.noise_weight[covered] = decay * self.state.noise_weight[covered] + n_images

    # ------------------------------------------------------------------------------------------- iterations

    def step(self) -> RefineIterationReport:
        """Run the next iteration: an online-EM minibatch, or a full pass once online EM has converged."""
        if self.done:
            raise RuntimeError("the refinement has finished")
        if self.state.online_done:
            return self._full_iteration()
        return self._online_iteration()

    def _next_minibatch(self) -> np.ndarray:
        n = len(self.particles)
        state = self.state
        if state.cursor + self.minibatch > n:
            state.epoch += 1
            state.epoch_order = random_stream(self.seed, _STREAM_ORDER, state.epoch).permutation(n)
            state.cursor = 0
        rows = np.sort(state.epoch_order[state.cursor : state.cursor + self.minibatch])
        state.cursor += self.minibatch
        return rows

    def _online_iteration(self) -> RefineIterationReport:
        state, params = self.state, self.params
        t = state.iteration
        random = t < params.random_assignment_iterations
        rows = self._next_minibatch()
        batch = common.read_batch(self.particles, rows, self.layout, self.ctf, self.half_set, self.xp)
        resolution = state.resolution_a
        only_class = random_stream(self.seed, _STREAM_RANDOM_CLASS, t).integers(0, self.class_count, rows.size) \
            if random else None
        posteriors, data, weight, residual = self._e_and_m(rows, batch, only_class, "global")
        rate = 1.0 if t == 0 else max(1.0 / (t + 1), rows.size / len(self.particles))
        state.data = (1 - rate) * state.data + (rate / rows.size) * data
        state.weight = (1 - rate) * state.weight + (rate / rows.size) * weight
        self._fold_noise(residual, rows.size, max(0.0, 1.0 - rows.size / common.NOISE_MEMORY_IMAGES))
        state.class_mass = (1 - _PRIOR_RATE) * state.class_mass + _PRIOR_RATE * posteriors.mean(axis=0)
        change = self._record(rows, posteriors, random)
        state.class_change_fraction = change
        state.iteration = t + 1
        converged = (not random and np.isfinite(change) and change < params.convergence_class_change_fraction)
        if converged or state.iteration >= params.max_online_iterations:
            state.online_done = True
        self._refresh()
        return self._report("random" if random else "online", resolution, rows.size, posteriors, change)

    def _full_iteration(self) -> RefineIterationReport:
        state, xp = self.state, self.xp
        search = "refine" if state.full_done == 0 else "local"
        resolution = state.resolution_a
        p = 2 * self.layout.working_box_px
        data = xp.zeros((self.class_count, 2, p, p, p), dtype=np.complex64)
        weight = xp.zeros((self.class_count, 2, p, p, p), dtype=np.float32)
        residual_total = xp.zeros(self.layout.count_within(resolution))
        changes, seen = 0, 0
        mass = np.zeros(self.class_count)
        n_total = len(self.particles)
        for rows, batch in common.iter_pass(self.particles, self.layout, self.ctf, self.half_set, xp):
            posteriors, batch_data, batch_weight, residual = self._e_and_m(rows, batch, None, search)
            data += batch_data
            weight += batch_weight
            residual_total += residual
            previous = state.last_class[rows]
            known = previous >= 0
            changes += int(np.sum(previous[known] != np.argmax(posteriors, axis=1)[known]))
            seen += int(known.sum())
            self._record(rows, posteriors, random=False)
            mass += posteriors.sum(axis=0)
        state.data, state.weight = data / n_total, weight / n_total
        self._fold_noise(residual_total, n_total, 0.0)
        state.class_mass = mass / n_total
        state.class_change_fraction = changes / seen if seen else float("nan")
        state.full_done += 1
        state.iteration += 1
        self._refresh()
        return self._report("full", resolution, n_total, state.posteriors, state.class_change_fraction)

    def _report(self, phase: str, resolution_a: float, scored: int, posteriors: np.ndarray, change: float
                ) -> RefineIterationReport:
        fractions = np.bincount(np.argmax(posteriors, axis=1), minlength=self.class_count) / posteriors.shape[0]
        return RefineIterationReport(
            iteration=self.state.iteration, phase=phase, resolution_a=float(resolution_a), particles_scored=scored,
            class_fractions=fractions, class_change_fraction=float(change),
            half_map_resolution_a=np.array([common.half_map_resolution_a(self.layout, f) for f in self.state.fsc]),
        )

    # ---------------------------------------------------------------------------------------------- result

    def finish(self) -> HeteroResult:
        """Volumes, half maps and FSCs on the particles' box, and every particle's class, pose and shift."""
        if not self.done:
            raise RuntimeError("the refinement has not finished")
        box, working = self.layout.box_px, self.layout.working_box_px
        half_counts = np.array([[np.sum((np.argmax(self.state.posteriors, axis=1) == k) & (self.half_set == h))
                                 for h in (0, 1)] for k in range(self.class_count)])
        volumes = np.stack([
            common.to_particle_box(wiener_from_half_sums(self.state.data[k], self.state.weight[k], working,
                                                         self.state.fsc[k]), box)
            for k in range(self.class_count)
        ])
        half_maps = np.stack([
            np.stack([common.to_particle_box(reconstruct_from_sums(self.state.data[k, h], self.state.weight[k, h],
                                                                   working, 3), box) for h in (0, 1)])
            for k in range(self.class_count)
        ])
        fsc = np.stack([common.pad_shells(f, box) for f in self.state.fsc])
        resolution = np.array([
            common.half_map_resolution_a(self.layout, self.state.fsc[k])
            if half_counts[k].min() >= _MIN_HALF_PARTICLES else np.nan for k in range(self.class_count)
        ])
        return HeteroResult(
            rotations=self.state.rotations.copy(), shift_px=self.state.shift_px.copy(),
            half_set=self.half_set.astype(np.int64), pixel_size_a=self.layout.pixel_size_a,
            volumes=volumes, half_maps=half_maps, class_posteriors=self.state.posteriors.copy(), fsc=fsc,
            resolution_a=resolution, iteration_count=self.state.iteration,
            final_class_change_fraction=float(self.state.class_change_fraction),
        )

