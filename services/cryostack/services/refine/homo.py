"""Homogeneous (gold-standard) refinement of one structure (SPEC §5.3).

Gold standard. The particles are split once into two half-sets (``rlnRandomSubset``: the split the input carries,
or a seeded draw); each half is
aligned only to its own half map and reconstructed from its own particles, so the FSC between the two halves is
an honest resolution estimate. Both halves start from the input volume low-passed to
``initial_lowpass_resolution_a``.

Iterations. Each iteration is one pass over all particles, streamed from the source. The first
``global_iterations`` search globally (:meth:`cryostack.core.search.PoseSearch.global_search`, the last of them
refined one grid level deeper); later ones search locally around each particle's previous pose and shift
(:meth:`~cryostack.core.search.PoseSearch.local_search`) over two steps either way, with steps sized to the
resolution and halved at every local iteration (:func:`cryostack.services.refine.common.local_steps`), so poses
keep sharpening while the resolution they allow is still being reached. Poses are
marginalised; the new half-set sums replace the old ones. The noise power per shell is the residual power of the
pass at each particle's best pose.

M-step. Each half map is the Wiener/MAP reconstruction of its sums with the half-set FSC (SPEC §4); the merged
map uses the full-data FSC ``2·FSC/(1+FSC)``. The automatic mask (low-pass, threshold at
``mask_threshold_fraction`` of the maximum, dilation, cosine soft edge) is made from the merged map each
iteration; the references of the next iteration are the masked half maps. The GSFSC is the masked FSC corrected by
phase randomisation beyond the point where the unmasked FSC falls below 0.8 (Chen et al. 2013,
:func:`cryostack.core.fsc.mask_corrected_fsc`), so a tight mask cannot inflate it; its 0.143 point plus a margin
is the next iteration's search resolution.

Stopping. Refinement stops once the GSFSC resolution has not improved on its best for two iterations after the
global ones (or at ``max_iterations``).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import numpy as np

from cryostack.core.backend import to_host
from cryostack.core.ctf import CtfParameters
from cryostack.core.fsc import fsc_curve, mask_corrected_fsc, resolution_at_threshold
from cryostack.core.masks import auto_mask
from cryostack.core.numerics import random_stream
from cryostack.core.reconstruction import reconstruct_from_sums, wiener_from_half_sums
from cryostack.core.search import PoseSearch
from cryostack.core.sources import ParticleSource
from cryostack.core.spectra import SpectralLayout
from cryostack.errors import InvalidArgumentError
from cryostack.services.refine import common
from cryostack.services.refine.parameters import HomoParameters
from cryostack.services.refine.results import HomoResult, RefineIterationReport

_STREAM_HALVES = 1
_STREAM_PHASES = 2
# Iterations without a better GSFSC resolution after which refinement stops, and what counts as better (Å).
_PATIENCE = 2
_IMPROVEMENT_A = 0.05
# Local iterations run before stopping is considered.
_MIN_LOCAL_ITERATIONS = 4


@dataclass
class _State:
    """What one iteration leaves for the next (what a checkpoint stores)."""

    iteration: int
    data: object  # (2, P, P, P) complex64 half-set sums Σ w·CTF·X/σ² of the last pass
    weight: object  # (2, P, P, P) float32
    noise_power: np.ndarray  # (n_shells,) float64 σ² per shell (working box)
    fsc_unmasked: np.ndarray  # (n_shells,)
    fsc_masked: np.ndarray
    fsc_corrected: np.ndarray
    mask: np.ndarray  # (D_w, D_w, D_w) float32
    resolution_a: float  # resolution the next iteration searches to
    history_a: np.ndarray  # (iterations,) GSFSC resolution after each iteration
    rotations: np.ndarray  # (N, 3, 3) float64
    shift_px: np.ndarray  # (N, 2) float32
    stopped: bool

    def to_bytes(self) -> bytes:
        return common.arrays_to_bytes(**{name: getattr(self, name) for name in self.__dataclass_fields__})

    @classmethod
    def from_bytes(cls, payload: bytes, xp: ModuleType) -> _State:
        z = common.arrays_from_bytes(payload)
        values = {name: z[name] for name in cls.__dataclass_fields__}
        values["iteration"] = int(values["iteration"])
        values["resolution_a"] = float(values["resolution_a"])
        values["stopped"] = bool(values["stopped"])
        values["data"], values["weight"] = xp.asarray(values["data"]), xp.asarray(values["weight"])
        return cls(**values)


class HomogeneousRefinement:
    """One gold-standard refinement: :meth:`step` until :attr:`done`, then :meth:`finish`."""

    def __init__(self, particles: ParticleSource, ctf: CtfParameters, volume: np.ndarray, pixel_size_a: float,
                 params: HomoParameters, seed: int, state: bytes | None = None, xp: ModuleType = np, *,
                 half_set: np.ndarray | None = None) -> None:
        """Start from ``volume`` (D, D, D), or continue from ``state`` (a checkpoint's bytes).

        ``half_set`` (N,) 0 or 1 keeps a split the particles already have; without it one is drawn from the seed.
        """
        n_particles, box = len(particles), int(particles.box_px)
        volume = np.asarray(volume, dtype=np.float32)
        if volume.shape != (box,) * 3:
            raise InvalidArgumentError("volume", f"expected ({box}, {box}, {box}), got {volume.shape}")
        params.check(n_particles, pixel_size_a)
        self.particles, self.ctf, self.params, self.seed, self.xp = particles, ctf, params, int(seed), xp
        self.finest_a = params.max_resolution_a or 2.0 * pixel_size_a
        self.layout = SpectralLayout.for_resolution(box, pixel_size_a, self.finest_a)
        self.search = PoseSearch(self.layout, xp)
        self.half_set = common.half_sets(half_set, n_particles, random_stream(self.seed, _STREAM_HALVES))
        if state is None:
            self.state = self._initial_state()
            start = common.working_volume(volume, self.layout, params.initial_lowpass_resolution_a, xp)
            self._references = xp.stack([start, start])  # (2, D_w, D_w, D_w)
        else:
            self.state = _State.from_bytes(state, xp)
            self._references = self._half_maps(masked=True)

    def _initial_state(self) -> _State:
        n, shells, working = len(self.particles), self.layout.n_shells, self.layout.working_box_px
        p = 2 * working
        first = np.arange(min(n, common.PASS_BATCH))
        power = common.image_power(common.read_batch(self.particles, first, self.layout, self.ctf, self.half_set,
                                                     self.xp), self.layout)
        return _State(
            iteration=0, data=self.xp.zeros((2, p, p, p), dtype=np.complex64),
            weight=self.xp.zeros((2, p, p, p), dtype=np.float32), noise_power=power,
            fsc_unmasked=np.zeros(shells), fsc_masked=np.zeros(shells), fsc_corrected=np.zeros(shells),
            mask=np.ones((working,) * 3, dtype=np.float32),
            resolution_a=float(self.params.initial_lowpass_resolution_a), history_a=np.zeros(0),
            rotations=np.tile(np.eye(3), (n, 1, 1)), shift_px=np.zeros((n, 2), dtype=np.float32), stopped=False,
        )

    def state_bytes(self) -> bytes:
        """The run's state as a checkpoint (``.npz``, no pickle)."""
        return self.state.to_bytes()

    @property
    def done(self) -> bool:
        """True once the resolution has stopped improving (or the iteration bound is reached)."""
        return self.state.stopped

    def _half_maps(self, masked: bool) -> object:
        """Both half maps (2, D_w, D_w, D_w), each Wiener-filtered with the half-set FSC (masked: times the mask)."""
        box = self.layout.working_box_px
        halves = self.xp.stack([reconstruct_from_sums(self.state.data[h], self.state.weight[h], box, 3,
                                                      fsc=self.state.fsc_unmasked) for h in (0, 1)])
        return halves * self.xp.asarray(self.state.mask) if masked else halves

    # ------------------------------------------------------------------------------------------- iterations

    def step(self) -> RefineIterationReport:
        """One pass over all particles: search, reconstruct both halves, measure the GSFSC, decide to go on."""
        if self.done:
            raise RuntimeError("the refinement has finished")
        state, xp, layout = self.state, self.xp, self.layout
        it = state.iteration
        is_global = it < self.params.global_iterations
        resolution = state.resolution_a
        count = layout.count_within(resolution)
        p = 2 * layout.working_box_px
        data = xp.zeros((2, p, p, p), dtype=np.complex64)
        weight = xp.zeros((2, p, p, p), dtype=np.float32)
        residual = xp.zeros(count)
        for rows, batch in common.iter_pass(self.particles, layout, self.ctf, self.half_set, xp):
            for half in (0, 1):
                members = np.flatnonzero(batch.half_set == half)
                if members.size == 0:
                    continue
                sub = common.sub_batch(batch, members, xp)
                reference = self._references[half]
                if is_global:
                    level = common.global_level(layout, resolution)
                    refine = it + 1 == self.params.global_iterations
                    post = self.search.global_search(sub, reference, state.noise_power, resolution, level,
                                                     common.max_shift_px(layout), refine=refine)
                else:
                    angular, shift = common.local_steps(layout, resolution, it - self.params.global_iterations)
                    post = self.search.local_search(
                        sub, reference, state.noise_power, resolution, state.rotations[rows[members]],
                        state.shift_px[rows[members]], angular, common.LOCAL_STEPS * angular, shift,
                        common.LOCAL_STEPS * shift)
                ones = np.ones((members.size, 1), dtype=np.float32)
                d, w = self.search.back_project(sub, [post], ones, state.noise_power)
                data += d[0]
                weight += w[0]
                state.rotations[rows[members]] = post.best_rotations
                state.shift_px[rows[members]] = post.best_shift_px
                residual += self.search.residual_power(sub, [post], np.zeros(members.size, dtype=np.int64),
                                                       reference[None])
        n_total = len(self.particles)
        state.data, state.weight = data / n_total, weight / n_total
        measured, covered = common.residual_shell_power(layout, residual, count)
        state.noise_power = state.noise_power.copy()
        state.noise_power[covered] = measured[covered] / n_total
        self._measure(resolution)
        state.iteration = it + 1
        gsfsc = common.half_map_resolution_a(layout, state.fsc_corrected)
        state.history_a = np.append(state.history_a, gsfsc)
        state.resolution_a = common.next_resolution_a(layout, state.fsc_corrected, self.finest_a,
                                                      self.params.initial_lowpass_resolution_a)
        self._references = self._half_maps(masked=True)
        state.stopped = self._should_stop()
        return RefineIterationReport(
            iteration=state.iteration, phase="global" if is_global else "local", resolution_a=resolution,
            particles_scored=n_total, class_fractions=np.ones(1), class_change_fraction=float("nan"),
            half_map_resolution_a=np.array([gsfsc]),
        )

    def _measure(self, resolution_a: float) -> None:
        """Unmasked FSC, the automatic mask, masked and corrected FSC of the new half-set sums.

        Shells beyond the resolution the pass scored to hold no data: their FSC is 0 (a mask's own spectrum would
        otherwise correlate the empty halves there).
        """
        state, layout = self.state, self.layout
        box = layout.working_box_px
        plain = [reconstruct_from_sums(state.data[h], state.weight[h], box, 3) for h in (0, 1)]
        merged = wiener_from_half_sums(state.data, state.weight, box, to_host(fsc_curve(plain[0], plain[1])))
        state.mask = to_host(auto_mask(merged, layout.working_pixel_size_a,
                                       threshold_fraction=self.params.mask_threshold_fraction,
                                       dilation_a=self.params.mask_dilation_a,
                                       soft_edge_a=self.params.mask_soft_edge_width_a)).astype(np.float32)
        unmasked, masked, corrected = mask_corrected_fsc(plain[0], plain[1], self.xp.asarray(state.mask),
                                                         self._rng())
        beyond = np.arange(layout.n_shells) > common.shell_of(layout, resolution_a)
        for curve in (unmasked, masked, corrected):
            curve[beyond] = 0.0
        state.fsc_unmasked, state.fsc_masked, state.fsc_corrected = unmasked, masked, corrected

    def _rng(self) -> np.random.Generator:
        return random_stream(self.seed, _STREAM_PHASES, self.state.iteration)

    def _should_stop(self) -> bool:
        """True at the iteration bound, or when the last iterations did not improve on the best before them."""
        state, params = self.state, self.params
        if params.max_iterations is not None and state.iteration >= params.max_iterations:
            return True
        if state.history_a.size - params.global_iterations < _MIN_LOCAL_ITERATIONS:
            return False
        best_earlier = float(state.history_a[:-_PATIENCE].min())
        return bool(state.history_a[-_PATIENCE:].min() > best_earlier - _IMPROVEMENT_A)

    # ---------------------------------------------------------------------------------------------- result

    def finish(self) -> HomoResult:
        """The map, half maps, mask and FSC curves on the particles' box, and every particle's pose and shift."""
        if not self.done:
            raise RuntimeError("the refinement has not finished")
        state, box, working = self.state, self.layout.box_px, self.layout.working_box_px
        plain = [common.to_particle_box(reconstruct_from_sums(state.data[h], state.weight[h], working, 3), box)
                 for h in (0, 1)]
        merged = wiener_from_half_sums(state.data, state.weight, working, state.fsc_corrected)
        pixel = self.layout.working_pixel_size_a
        return HomoResult(
            rotations=state.rotations.copy(), shift_px=state.shift_px.copy(), half_set=self.half_set.astype(np.int64),
            pixel_size_a=self.layout.pixel_size_a, map=common.to_particle_box(merged, box),
            half_maps=np.stack(plain), mask=_mask_on_box(state.mask, box),
            fsc_unmasked=common.pad_shells(state.fsc_unmasked, box),
            fsc_masked=common.pad_shells(state.fsc_masked, box),
            fsc_corrected=common.pad_shells(state.fsc_corrected, box),
            resolution_a=common.half_map_resolution_a(self.layout, state.fsc_corrected),
            unmasked_resolution_a=float(resolution_at_threshold(state.fsc_unmasked, working, pixel, 0.143)),
            iteration_count=state.iteration, resolution_history_a=state.history_a.copy(),
        )


def _mask_on_box(mask: np.ndarray, box_px: int) -> np.ndarray:
    """The working-box mask (D_w³) on the particles' box (D³), clipped to [0, 1]."""
    if mask.shape[0] == box_px:
        return mask.astype(np.float32)
    return np.clip(common.to_particle_box(mask * (box_px / mask.shape[0]) ** 3, box_px), 0.0, 1.0)
