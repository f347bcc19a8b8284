"""3D pose search of particle batches against volumes: global coarse-to-fine, or local around given poses.

Both searches score a batch of particles (:class:`cryostack.core.spectra.ParticleBatch`) against projections of
one volume on the working box, with the CTF and the radial noise model, and marginalise over the poses they
score; they return the significant poses as sparse entries (:class:`ClassPosteriors`) that
:meth:`PoseSearch.back_project` turns into the half-set sums ``Σ w·CTF·X/σ²`` and ``Σ w·CTF²/σ²`` of a
reconstruction. A particle's posteriors never depend on the other particles of its batch.

Global search. Coarse to fine, as in RELION's adaptive sampling: the whole SO(3) grid of a level with a shift
lattice of twice the fine step, on the coefficients inside twice the resolution (at least
:data:`COARSE_MIN_SHELLS` shells); then, on every coefficient, each particle against its own :data:`COARSE_KEEP`
best coarse rotations (with ``refine``: the children on the next grid of its :data:`REFINE_PARENTS` best) and a
local shift lattice around its best coarse shift.

Local search. Each particle against its own small rotations ``R·Δ`` around a given pose ``R`` (Δ on a cubic
lattice of rotation vectors, :func:`cryostack.core.poses.local_rotations`) and a shift lattice around a given
shift, with the steps the caller sizes to the current resolution.

Entries below :data:`POSTERIOR_FLOOR` (normalised per particle and class) are dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import scipy.sparse

from cryostack.core.backend import to_host
from cryostack.core.fourier import resolution_to_shell
from cryostack.core.poses import local_rotations, shift_step_px, so3_children, so3_grid_matrices
from cryostack.core.projection import FourierAccumulator, Projector
from cryostack.core.scoring import iter_log_likelihoods, iter_posteriors, local_log_likelihoods, shift_phase_ramps
from cryostack.core.spectra import ParticleBatch, SpectralLayout

# The coarse stage of the global search scores at half the resolution, but on at least this many shells.
COARSE_MIN_SHELLS = 6.0
# Best coarse rotations per particle carried to the fine stage, and parents refined on the finer grid (8 children
# each). The coarse stage scores at half the resolution, where the true pose of a clean projection at 20 Å ranks
# beyond the 16th for a fifth of the particles: these counts recover it as often as scoring every particle of a
# batch against all of the batch's candidates did.
COARSE_KEEP = 128
REFINE_PARENTS = 32
# Working memory of one scoring block (the kernel splits particles × templates to stay within it).
SCORING_BLOCK_BYTES = 64 * 2**20
# Posteriors (normalised per particle and class) below this are neither back-projected nor kept.
POSTERIOR_FLOOR = 1e-4


def shift_lattice(step_px: float, radius_px: float) -> np.ndarray:
    """Square lattice of shifts (S, 2) px, (x, y), with the given step inside a disc of the given radius."""
    half = math.floor(radius_px / step_px + 1e-9)
    axis = np.arange(-half, half + 1) * step_px
    gx, gy = np.meshgrid(axis, axis, indexing="xy")
    grid = np.stack([gx.ravel(), gy.ravel()], axis=1)
    keep = np.hypot(grid[:, 0], grid[:, 1]) <= radius_px + 1e-6
    return grid[keep].astype(np.float32)


def sparse_module(xp: ModuleType) -> Any:
    """The sparse-matrix namespace of an array module: scipy.sparse, or cupyx.scipy.sparse for cupy."""
    if xp is np:
        return scipy.sparse
    import cupyx.scipy.sparse  # noqa: PLC0415

    return cupyx.scipy.sparse


@dataclass(frozen=True)
class ClassPosteriors:
    """The significant poses of a batch of particles in one class, as sparse entries.

    The entries (``particle`` … ``weight``) stay on the run's device; the per-particle summaries are host arrays.
    """

    count: int  # coefficients scored (the resolution limit)
    rotations: np.ndarray  # (M, 3, 3) the rotations ``template`` refers to
    shifts_px: np.ndarray  # (S, 2) the shift lattice ``shift`` refers to, relative to each particle's centre
    centre_px: np.ndarray  # (n, 2) per-particle shift the lattice is centred on
    particle: Any  # (E,) int64 entry's particle (row in the batch)
    template: Any  # (E,) int64
    shift: Any  # (E,) int64
    weight: Any  # (E,) float32 posterior within the class (each particle's entries sum to about 1)
    log_evidence: np.ndarray  # (n,) float64 log Σ_{A,s} exp(LL) over the scored poses
    best_template: np.ndarray  # (n,) int64
    best_shift: np.ndarray  # (n,) int64

    @property
    def best_rotations(self) -> np.ndarray:
        """Each particle's most probable rotation: (n, 3, 3) float64."""
        return self.rotations[self.best_template]

    @property
    def best_shift_px(self) -> np.ndarray:
        """Each particle's most probable image shift (x, y): (n, 2) float32."""
        return self.centre_px + self.shifts_px[self.best_shift]


class PoseSearch:
    """Scoring, marginalisation and back-projection of particle batches on one spectral layout and device."""

    def __init__(self, layout: SpectralLayout, xp: ModuleType = np) -> None:
        self.layout = layout
        self.xp = xp
        self.working_box = layout.working_box_px
        self.flat_working = layout.flat_indices(self.working_box)  # (C,) into the D_w grid
        self.flat_particle = layout.flat_indices(layout.box_px)  # (C,) into the D grid
        self.fy, self.fx = (xp.asarray(f) for f in layout.frequencies_inv_a())  # (C,) on the device

    # ------------------------------------------------------------------------------------------------ terms

    def particle_terms(self, batch: ParticleBatch, count: int, centre_px: np.ndarray | None) -> tuple[Any, Any]:
        """On the device: coefficients moved back by each particle's centre shift (n, C) complex64 (``None``: not
        moved), and their CTF (n, C) float32."""
        x = batch.coefficients[:, :count]
        if centre_px is not None:
            x = x * self.shift_ramps(centre_px, count)  # (n, C)
        return x, batch.ctf.at(self.fy[:count], self.fx[:count])

    def shift_ramps(self, shifts_px: np.ndarray, count: int) -> Any:
        """Phase ramps (S, C) complex64 on the device of shifts (S, 2) px over the first ``count`` coefficients."""
        return shift_phase_ramps(self.xp.asarray(shifts_px), self.layout.box_px, self.flat_particle[:count])

    def noise_variance(self, noise_power: np.ndarray, count: int) -> np.ndarray:
        """Per-coefficient σ² (C,) float32 of the first ``count`` coefficients from the power per shell.

        Half-plane coefficients stand for two of the full plane: their variance term counts twice.
        """
        return (0.5 * noise_power[self.layout.shell[:count]]).astype(np.float32)

    def templates(self, volume: Any, rotations: np.ndarray, count: int) -> Any:
        """Projections (M, C) complex64 of a working-box volume at rotations (M, 3, 3), first ``count`` coefficients."""
        return Projector(volume).project(rotations, coefficients=self.flat_working[:count])

    # ----------------------------------------------------------------------------------------------- search

    def global_search(self, batch: ParticleBatch, volume: Any, noise_power: np.ndarray, resolution_a: float,
                      level: int, max_shift_px: float, refine: bool = False) -> ClassPosteriors:
        """Posteriors of a batch over one volume's rotations on the level's grid and shifts (module docstring)."""
        n = batch.n_particles
        count = self.layout.count_within(resolution_a)
        shell_limit = resolution_to_shell(self.layout.box_px, self.layout.pixel_size_a, resolution_a)
        coarse_shells = min(shell_limit, max(shell_limit / 2, COARSE_MIN_SHELLS))
        coarse_count = self.layout.count_within(resolution_a * shell_limit / coarse_shells)
        fine_step = shift_step_px(resolution_a, self.layout.pixel_size_a)
        two_stage = coarse_count < count
        coarse_step = 2 * fine_step if two_stage else fine_step
        coarse_shifts = shift_lattice(coarse_step, max_shift_px)
        grid = so3_grid_matrices(level)
        projector = Projector(volume)
        if not two_stage and not refine:
            templates = projector.project(grid, coefficients=self.flat_working[:count])
            zero = np.zeros((n, 2), dtype=np.float32)
            return self.marginalise(batch, count, grid, templates, coarse_shifts, zero, noise_power)
        templates = projector.project(grid, coefficients=self.flat_working[:coarse_count])
        best_shift, top = self.coarse(batch, coarse_count, templates, coarse_shifts, noise_power)
        centre = coarse_shifts[best_shift]  # (n, 2)
        # Each particle's own rotations: its best coarse ones, or when refining their children on the next grid.
        # They are projected once for the batch (their union) and each particle is scored against its own only,
        # so its posteriors do not depend on which particles share its batch.
        if refine:
            own = so3_children(level, top[:, :REFINE_PARENTS].ravel()).reshape(n, -1)
        else:
            own = top[:, :COARSE_KEEP]
        union, index = np.unique(own, return_inverse=True)
        rotations = so3_grid_matrices(level + 1, union) if refine else grid[union]
        # The true shift lies within half a coarse step of the best coarse one along each axis; a disc of one
        # coarse step around it covers that square with a margin.
        local = shift_lattice(fine_step, coarse_step * 1.01)
        templates = projector.project(rotations, coefficients=self.flat_working[:count])
        return self.marginalise_local(batch, count, rotations, templates, index.reshape(own.shape), local, centre,
                                      noise_power)

    def local_search(self, batch: ParticleBatch, volume: Any, noise_power: np.ndarray, resolution_a: float,
                     rotations: np.ndarray, shift_px: np.ndarray, angular_step_deg: float, angular_radius_deg: float,
                     shift_step_size_px: float, shift_radius_px: float) -> ClassPosteriors:
        """Posteriors of a batch over rotations (n, 3, 3) · small rotations and shifts (n, 2) + a local lattice."""
        n = batch.n_particles
        count = self.layout.count_within(resolution_a)
        around = local_rotations(rotations, angular_step_deg, angular_radius_deg)  # (n, P, 3, 3)
        per_particle = around.shape[1]
        flat = around.reshape(-1, 3, 3)
        own = np.arange(n * per_particle, dtype=np.int64).reshape(n, per_particle)
        templates = Projector(volume).project(flat, coefficients=self.flat_working[:count])
        lattice = shift_lattice(shift_step_size_px, shift_radius_px)
        return self.marginalise_local(batch, count, flat, templates, own, lattice,
                                      np.asarray(shift_px, dtype=np.float32), noise_power)

    def coarse(self, batch: ParticleBatch, count: int, templates: Any, shifts_px: np.ndarray,
               noise_power: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The coarse stage: each particle's best shift (n,) and most likely templates (n, k), best first.

        Templates are ranked by their best log-likelihood over the shifts: a ranking needs no normalisation,
        so no exponential is taken.
        """
        xp, n = self.xp, batch.n_particles
        x, ctf = self.particle_terms(batch, count, None)
        noise_var = self.noise_variance(noise_power, count)
        ramps = self.shift_ramps(shifts_px, count)  # (S, C)
        peak = xp.empty((n, templates.shape[0]), dtype=np.float32)  # (n, M) best LL over shifts
        best_value = xp.full(n, -np.inf, dtype=np.float32)
        best_shift = xp.zeros(n, dtype=np.int64)
        for block in iter_log_likelihoods(x, templates, ctf=ctf, noise_var=noise_var, shift_ramps=ramps,
                                          max_bytes=SCORING_BLOCK_BYTES):
            values = block.shift_terms  # (b, S, m), made log-likelihoods in place
            values -= block.offset[:, None, :]
            b, _, m = values.shape
            peak[block.particles, block.templates] = values.max(axis=1)
            flat = values.reshape(b, -1)
            arg = xp.argmax(flat, axis=1)  # (b,) over (shift, template)
            value = flat[xp.arange(b), arg]
            better = value > best_value[block.particles]
            rows_better = xp.flatnonzero(better) + block.particles.start
            best_value[rows_better] = value[better]
            best_shift[rows_better] = arg[better] // m
        keep = min(max(COARSE_KEEP, REFINE_PARENTS), templates.shape[0])
        top = xp.argpartition(-peak, keep - 1, axis=1)[:, :keep]
        top = xp.take_along_axis(top, xp.argsort(-xp.take_along_axis(peak, top, axis=1), axis=1), axis=1)
        return to_host(best_shift), to_host(top)

    def marginalise(self, batch: ParticleBatch, count: int, rotations: np.ndarray, templates: Any,
                    shifts_px: np.ndarray, centre_px: np.ndarray, noise_power: np.ndarray) -> ClassPosteriors:
        """Marginalise a batch over all templates × shifts (relative to their centres); keep the significant."""
        xp, n = self.xp, batch.n_particles
        x, ctf = self.particle_terms(batch, count, centre_px)
        noise_var = self.noise_variance(noise_power, count)
        ramps = self.shift_ramps(shifts_px, count)  # (S, C)
        log_evidence = xp.zeros(n)
        best_value = xp.full(n, -1.0)
        best_template = xp.zeros(n, dtype=np.int64)
        best_shift = xp.zeros(n, dtype=np.int64)
        kept: list[tuple[Any, ...]] = []
        for block in iter_posteriors(x, templates, ctf=ctf, noise_var=noise_var, shift_ramps=ramps,
                                     max_bytes=SCORING_BLOCK_BYTES):
            values = block.values  # (b, S, m)
            p0, t0 = block.particles.start, block.templates.start
            b, n_shifts, m = values.shape
            log_evidence[block.particles] = block.log_evidence.astype(np.float64)
            flat = values.reshape(b, -1)
            arg = xp.argmax(flat, axis=1)
            peak = flat[xp.arange(b), arg]
            better = peak > best_value[block.particles]
            rows_better = xp.flatnonzero(better) + p0
            best_value[rows_better] = peak[better]
            best_shift[rows_better] = arg[better] // m
            best_template[rows_better] = arg[better] % m + t0
            particle, shift, template = xp.nonzero(values >= POSTERIOR_FLOOR)
            kept.append((particle + p0, template + t0, shift, values[particle, shift, template]))
        particle, template, shift, weight = (xp.concatenate(column) for column in zip(*kept, strict=True))
        return ClassPosteriors(
            count=count,
            rotations=rotations,
            shifts_px=shifts_px,
            centre_px=centre_px,
            particle=particle.astype(np.int64),
            template=template.astype(np.int64),
            shift=shift.astype(np.int64),
            weight=weight.astype(np.float32),
            log_evidence=to_host(log_evidence),
            best_template=to_host(best_template),
            best_shift=to_host(best_shift),
        )

    def marginalise_local(self, batch: ParticleBatch, count: int, rotations: np.ndarray, templates: Any,
                          own: np.ndarray, shifts_px: np.ndarray, centre_px: np.ndarray, noise_power: np.ndarray
                          ) -> ClassPosteriors:
        """Marginalise each particle over its own templates ``own`` (n, m) × shifts around its centre.

        A template listed twice for one particle (two parents can share a child) counts once.
        """
        xp, (n, m) = self.xp, own.shape
        x, ctf = self.particle_terms(batch, count, centre_px)
        noise_var = self.noise_variance(noise_power, count)
        ramps = self.shift_ramps(shifts_px, count)  # (S, C)
        ll = local_log_likelihoods(x, templates, own, ctf=ctf, noise_var=noise_var, shift_ramps=ramps,
                                   max_bytes=SCORING_BLOCK_BYTES)  # (n, S, m)
        order = np.argsort(own, axis=1)
        repeated = np.zeros((n, m), dtype=bool)
        np.put_along_axis(repeated, order[:, 1:], np.diff(np.take_along_axis(own, order, axis=1), axis=1) == 0,
                          axis=1)
        scores = xp.where(xp.asarray(repeated)[:, None, :], -np.inf, ll.astype(np.float64)).reshape(n, -1)  # (n, S·m)
        best = xp.argmax(scores, axis=1)
        relative = xp.exp(scores - scores[xp.arange(n), best][:, None])
        total = relative.sum(axis=1)
        weight = relative / total[:, None]
        particle, pair = xp.nonzero(weight >= POSTERIOR_FLOOR)
        shift, slot = xp.divmod(pair, m)
        own_device = xp.asarray(own)
        best = to_host(best)
        return ClassPosteriors(
            count=count,
            rotations=rotations,
            shifts_px=shifts_px,
            centre_px=centre_px,
            particle=particle.astype(np.int64),
            template=own_device[particle, slot].astype(np.int64),
            shift=shift.astype(np.int64),
            weight=weight[particle, pair].astype(np.float32),
            log_evidence=to_host(scores[xp.arange(n), xp.asarray(best)] + xp.log(total)),
            best_template=own[np.arange(n), best % m].astype(np.int64),
            best_shift=(best // m).astype(np.int64),
        )

    # ------------------------------------------------------------------------------------------------ M-step

    def back_project(self, batch: ParticleBatch, search: list[ClassPosteriors], class_weights: Any,
                     noise_power: np.ndarray) -> tuple[Any, Any]:
        """Per class and half-set, the sums ``Σ w·CTF·X/σ²`` and ``Σ w·CTF²/σ²`` over the batch's poses.

        ``class_weights`` (n, K) weighs each particle's entries per class; the sums (K, 2, P, P, P) stay on the
        device (``P`` = twice the working box).
        """
        xp, sparse = self.xp, sparse_module(self.xp)
        n = batch.n_particles
        p = 2 * self.working_box
        count = search[0].count
        inv_var = xp.asarray((1.0 / noise_power[self.layout.shell[:count]]).astype(np.float32))
        data = xp.zeros((len(search), 2, p, p, p), dtype=np.complex64)
        weight = xp.zeros((len(search), 2, p, p, p), dtype=np.float32)
        halves = xp.asarray(batch.half_set)
        class_weights = xp.asarray(class_weights)
        for k, post in enumerate(search):
            x, ctf = self.particle_terms(batch, count, post.centre_px)
            ramps = self.shift_ramps(post.shifts_px, count)  # (S, C)
            n_shifts = ramps.shape[0]
            aligned = ((x * ctf * inv_var)[:, None, :] * ramps[None, :, :]).reshape(n * n_shifts, count)
            aligned_real = aligned.view(np.float32)  # (n·S, 2C)
            power = ctf * ctf * inv_var  # (n, C)
            w = post.weight * class_weights[post.particle, k].astype(np.float32)  # (E,)
            n_rot = post.rotations.shape[0]
            for half in (0, 1):
                sel = halves[post.particle] == half
                if not bool(sel.any()):
                    continue
                particle, template = post.particle[sel], post.template[sel]
                column = particle * n_shifts + post.shift[sel]
                by_pair = sparse.csr_matrix((w[sel], (template, column)), shape=(n_rot, n * n_shifts))
                by_particle = sparse.csr_matrix((w[sel], (template, particle)), shape=(n_rot, n))
                used = xp.flatnonzero(xp.diff(by_particle.indptr))
                # Real arithmetic on the interleaved (Re, Im) view: sparse × complex runs far slower.
                slices = xp.ascontiguousarray(by_pair[used] @ aligned_real).view(np.complex64)  # (U, C)
                slice_weights = xp.asarray(by_particle[used] @ power, dtype=np.float32)  # (U, C)
                accumulator = FourierAccumulator(self.working_box, xp=xp)
                accumulator.insert(slices, post.rotations[to_host(used)], slice_weights,
                                   coefficients=self.flat_working[:count])
                data[k, half], weight[k, half] = accumulator.padded_sums()
        return data, weight

    def residual_power(self, batch: ParticleBatch, search: list[ClassPosteriors], best_class: np.ndarray,
                       volumes: Any) -> Any:
        """Σ over the batch of |X − CTF·P(V)|² per coefficient (C,) float64 at each particle's best class and pose."""
        count = search[0].count
        residual_power = self.xp.zeros(count)  # (C,) float64
        for k, post in enumerate(search):
            members = np.flatnonzero(best_class == k)
            if members.size == 0:
                continue
            x = batch.coefficients[self.xp.asarray(members), :count] * self.shift_ramps(post.centre_px[members], count)
            ctf = batch.ctf.take(members).at(self.fy[:count], self.fx[:count])
            templates = Projector(volumes[k]).project(
                post.rotations[post.best_template[members]], coefficients=self.flat_working[:count]
            )  # (m, C)
            ramps = self.shift_ramps(post.shifts_px[post.best_shift[members]], count)
            residual = x * ramps - ctf * templates
            residual_power += (residual.real**2 + residual.imag**2).sum(axis=0)
        return residual_power

