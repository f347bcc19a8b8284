"""Pose search of 2D classification: every particle of a batch against every class over in-plane angles and shifts.

A coarse global search on a low-resolution prefix of the half-plane coefficients, then a local search of each
particle's best classes at the current resolution (the driver, :mod:`cryostack.services.classify2d.algorithm`, tells
the whole story). :class:`PoseSearch` plans an iteration's grids and builds its scorer; :class:`Alignment` is what a
scorer returns for a batch, and what a full pass keeps per particle.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from types import ModuleType
from typing import Any

import numpy as np

from cryostack.core.backend import array_module, to_host
from cryostack.core.capacity import top_class_columns
from cryostack.core.fourier import (
    centered_frequency_indices,
    coefficient_frequencies,
    frequency_radius_px,
    n_shells,
    resolution_to_shell,
    shell_to_resolution_a,
)
from cryostack.core.geometry import rotation_matrix_2d
from cryostack.core.poses import inplane_angle_step_deg, inplane_angles_deg, shift_grid_px, shift_step_px
from cryostack.core.projection import Projector2D
from cryostack.core.scoring import (
    LogLikelihoodBlock,
    iter_log_likelihoods,
    local_log_likelihoods,
    prepare_templates,
    shift_phase_ramps,
)
from cryostack.services.classify2d.parameters import Classify2DParameters

# Shells scored beyond the current (FRC) resolution, so alignment can improve on it.
RESOLUTION_MARGIN_SHELLS = 3
# Largest Fourier shell of the coarse global search; its cost grows as the fifth power of this.
COARSE_SHELLS = 8
# Classes per particle refined by the local search.
CANDIDATE_CLASSES = 4
# Shift search range as a fraction of the box width (RELION/cryoSPARC search about this much).
MAX_SHIFT_FRACTION = 0.1
# Poses per (particle, class) inserted in marginalised mode.
MARGINAL_POSES = 3
# (Particle, class) pairs per local-search call, and the working memory of its blocks.
_LOCAL_PAIRS = 2048
_LOCAL_BYTES = 64 * 2**20


@dataclass(frozen=True)
class Coefficients:
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


def half_plane_coefficients(box_px: int, pixel_size_a: float, resolution_a: float) -> Coefficients:
    """One coefficient of each Friedel pair inside ``resolution_a``, sorted by frequency (DC first)."""
    half = box_px // 2
    radius = frequency_radius_px(box_px, 2).ravel()  # (D²,)
    limit = np.float32(resolution_to_shell(box_px, pixel_size_a, resolution_a))
    flat = np.arange(box_px * box_px)
    ky, kx = coefficient_frequencies(box_px, flat)
    mate = ((-ky + half) % box_px) * box_px + ((-kx + half) % box_px)
    keep = (radius <= limit) & (flat <= mate)
    flat = flat[keep]
    order = np.argsort(radius[flat], kind="stable")
    flat = flat[order]
    ky, kx = coefficient_frequencies(box_px, flat)
    scale = 1.0 / (box_px * pixel_size_a)
    return Coefficients(
        flat=flat,
        fy=ky * scale,
        fx=kx * scale,
        radius=radius[flat].astype(np.float32),
        shell=np.rint(radius[flat]).astype(np.int64),
        multiplicity=np.where(flat == mate[flat], 1.0, 2.0).astype(np.float32),
    )


@dataclass(frozen=True)
class SearchPlan:
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
class Batch:
    """A batch of particles prepared for scoring and insertion (transforms and CTF on the classifier's device)."""

    rows: np.ndarray  # (B,) int64 particle indices
    coefficients: Any  # (B, C) complex64 transforms at a prefix of the half-plane coefficients (DC first)
    ctf: Any | None  # (B, C) float32 CTF at those coefficients (None: no CTF correction)
    half: np.ndarray  # (B,) int64 half-set 0 or 1


@dataclass
class Alignment:
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
    def gather(parts: Iterable[tuple[np.ndarray, Alignment]], n_rows: int) -> Alignment:
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
        return Alignment(**table, residual_power=np.asarray(residual_power), residual_count=np.asarray(residual_count))

    def best_classes(self, count: int, *, marginal_poses: bool) -> Alignment:
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

    def take(self, rows: np.ndarray) -> Alignment:
        """The alignment of particles ``rows`` (the residual sums stay those of the whole table)."""
        return replace(self, **{
            name: None if getattr(self, name) is None else getattr(self, name)[rows] for name in _PER_PARTICLE_FIELDS
        })


# The fields of an alignment with one row per particle.
_PER_PARTICLE_FIELDS = (
    "class_ll", "angle_deg", "shift_px", "candidates", "pose_angle_deg", "pose_shift_px", "pose_weight", "classes",
    "excluded_bound", "excluded_log_mass",
)


class PoseSearch:
    """Aligns batches of particles against the class averages of one iteration (see the module docstring)."""

    def __init__(
        self,
        params: Classify2DParameters,
        coefficients: Coefficients,
        box_px: int,
        pixel_size_a: float,
        particle_diameter_a: float,
        xp: ModuleType = np,
    ) -> None:
        """``xp`` (numpy, or cupy for the GPU) is where batches are scored; the alignments returned are host arrays."""
        self.params = params
        self.coefficients = coefficients
        self.box_px = box_px
        self.pixel_size_a = pixel_size_a
        self.particle_diameter_a = particle_diameter_a
        self.xp = xp
        self.n_classes = params.class_count
        self.n_shells = n_shells(box_px)
        self.max_resolution_a = params.resolution_limit_a(pixel_size_a)
        self.max_shift_px = MAX_SHIFT_FRACTION * box_px

    def plan(self, resolution_a: float) -> SearchPlan:
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
        return SearchPlan(
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

    def noise_variance(self, noise_power: np.ndarray, annealing_weight: float, count: int) -> np.ndarray:
        """σ² per scored coefficient (list positions 1 .. count-1) from σ²(ν) ``noise_power`` (shells,), moved from the
        white spectrum of equal power towards it by ``annealing_weight`` (sigma annealing), over the multiplicity."""
        estimate = np.maximum(noise_power, 1e-30)  # (shells,)
        shells = self.coefficients.shell[1:count]
        inside = np.arange(self.n_shells) <= shells.max(initial=0)
        counts = np.bincount(shells, minlength=self.n_shells).astype(np.float64)
        white = float(np.sum(estimate[inside] * counts[inside]) / max(counts[inside].sum(), 1.0))
        annealed = (1.0 - annealing_weight) * white + annealing_weight * estimate
        return (annealed[shells] / self.coefficients.multiplicity[1:count]).astype(np.float32)

    def scorer(self, averages: np.ndarray, plan: SearchPlan, noise_var: np.ndarray) -> Callable[[Batch], Alignment]:
        """A function aligning batches against class ``averages`` (K, D, D) with σ² ``noise_var`` (C2 - 1,) per
        scored coefficient (templates and grids built once)."""
        n_coarse = plan.coarse_count - 1
        flat = self.coefficients.flat[1 : plan.fine_count]  # (C2 - 1,) scored coefficients, DC left out
        xp = self.xp
        projector = Projector2D(xp.asarray(averages), pad_factor=self.params.zero_pad_factor)
        coarse = projector.rotate(rotation_matrix_2d(plan.coarse_angles_deg), coefficients=flat[:n_coarse])
        coarse_templates = prepare_templates(coarse.reshape(-1, n_coarse))  # (K·R1, C1 - 1)
        fine = projector.rotate(rotation_matrix_2d(plan.fine_angles_deg), coefficients=flat)  # (K, R2, C2)
        coarse_ramps = shift_phase_ramps(xp.asarray(plan.coarse_shifts_px), self.box_px, flat)  # (S1, C2)
        local_ramps = shift_phase_ramps(xp.asarray(plan.local_shifts_px), self.box_px, flat)  # (S2, C2)
        return lambda batch: self._align(batch, plan, coarse_templates, fine, coarse_ramps, local_ramps, noise_var)

    def _align(
        self,
        batch: Batch,
        plan: SearchPlan,
        coarse_templates: Any,
        fine: Any,
        coarse_ramps: Any,
        local_ramps: Any,
        noise_var: np.ndarray,
    ) -> Alignment:
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
            fold_coarse_block(block, r1, coarse_ll[p], coarse_angle[p], coarse_shift[p])
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
        return Alignment(
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
        plan: SearchPlan,
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
        plan: SearchPlan,
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
        ramps = pair_ramps(xp.asarray(shifts), self.box_px, flat)  # (B, C): moves each particle back by -s
        prediction = templates if ctf is None else templates * ctf
        residual = x * ramps - prediction
        power = (residual.real**2 + residual.imag**2).astype(np.float64)  # (B, C)
        shells = self.coefficients.shell[1 : 1 + n_scored]
        return (
            np.bincount(shells, weights=to_host(power.sum(axis=0)), minlength=self.n_shells)[: self.n_shells],
            np.bincount(shells, minlength=self.n_shells)[: self.n_shells] * float(n_rows),
        )


def fold_coarse_block(
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


def pair_ramps(shifts_px: Any, box_px: int, flat: np.ndarray) -> Any:
    """Phase ramps (B, C) complex64 moving each particle back by its own shift (B, 2) at flat coefficient indices,
    on the shifts' device."""
    # exp(2πi (kx·sx + ky·sy) / D) factorises over the axes: 2·B·D exponentials instead of B·C.
    xp = array_module(shifts_px)
    k = centered_frequency_indices(box_px, xp)
    scale = 2j * np.pi / box_px
    along_x = xp.exp(scale * shifts_px[:, :1] * k[None, :]).astype(np.complex64)  # (B, D)
    along_y = xp.exp(scale * shifts_px[:, 1:] * k[None, :]).astype(np.complex64)  # (B, D)
    flat = xp.asarray(flat)
    return along_x[:, flat % box_px] * along_y[:, flat // box_px]
