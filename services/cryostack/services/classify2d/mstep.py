"""M-step of 2D classification: particles inserted at their poses into half-set accumulators, class averages.

Insertions are CTF-weighted sums ``Σ r·CTF·X`` and ``Σ r·CTF²`` in padded 2D Fourier accumulators, one per class and
random half-set; the running sums move towards a step's new sums by η, and the class averages are Wiener estimates
with τ² from the half-set FRC, masked and re-centred (the driver, :mod:`cryostack.services.classify2d.algorithm`,
tells the whole story).
"""

from __future__ import annotations

from types import ModuleType

import numpy as np

from cryostack.core.backend import to_host
from cryostack.core.fourier import fft2_centered, ifft2_centered, phase_shift_2d
from cryostack.core.fsc import HALF_MAP_THRESHOLD, frc_curves, resolution_at_threshold
from cryostack.core.geometry import rotation_matrix_2d
from cryostack.core.reconstruction import (
    DEFAULT_TAU2_FUDGE_2D,
    Reconstructor2D,
    full_data_fsc,
    reconstruct_from_sums,
)
from cryostack.services.classify2d.parameters import Classify2DParameters
from cryostack.services.classify2d.search import Alignment, Batch, Coefficients, pair_ramps
from cryostack.services.classify2d.state import ClassificationState

# Resolution of the first iteration (Å), before any class has an FRC.
INITIAL_RESOLUTION_A = 25.0
# A particle enters the M-step of at most this many classes (its most probable ones, weights rescaled to keep the
# particle's total), each with a responsibility of at least MIN_INSERT_WEIGHT: early, soft iterations would
# otherwise insert every particle into every class.
INSERT_CLASSES = 4
MIN_INSERT_WEIGHT = 1e-3
# Classes need this many particles before their FRC counts towards the current resolution.
MIN_FRC_PARTICLES = 10
# Insertions per chunk (memory bound).
_INSERT_CHUNK = 512


class MStep:
    """Inserts particles into half-set sums and turns running sums into class averages (see the module docstring)."""

    def __init__(
        self,
        params: Classify2DParameters,
        coefficients: Coefficients,
        box_px: int,
        pixel_size_a: float,
        mask: np.ndarray,
        xp: ModuleType = np,
    ) -> None:
        """``mask`` (D, D) is the soft circular mask of the class averages; ``xp`` is where insertions are made."""
        self.params = params
        self.coefficients = coefficients
        self.box_px = box_px
        self.pixel_size_a = pixel_size_a
        self.mask = mask
        self.xp = xp
        self.n_classes = params.class_count
        self.max_resolution_a = params.resolution_limit_a(pixel_size_a)

    def reconstructors(self) -> list[Reconstructor2D]:
        """Fresh half-set accumulators, one per random half."""
        return [
            Reconstructor2D(self.n_classes, self.box_px, pad_factor=self.params.zero_pad_factor, xp=self.xp)
            for _ in (0, 1)
        ]

    @staticmethod
    def padded_sums(reconstructors: list[Reconstructor2D]) -> tuple[np.ndarray, np.ndarray]:
        """Half-set padded sums on the host: data (2, K, P, P) complex64, weight (2, K, P, P) float32."""
        pairs = [r.accumulator.padded_sums() for r in reconstructors]
        return np.stack([to_host(p[0]) for p in pairs]), np.stack([to_host(p[1]) for p in pairs])

    def accumulate(self, parts: list[tuple[Batch, Alignment, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        """Insert batches with their responsibilities into fresh half-set accumulators."""
        reconstructors = self.reconstructors()
        for batch, alignment, weights in parts:
            self.insert(reconstructors, batch, alignment, weights)
        return self.padded_sums(reconstructors)

    def insert(
        self, reconstructors: list[Reconstructor2D], batch: Batch, alignment: Alignment, weights: np.ndarray
    ) -> None:
        """Insert each particle into every class it belongs to with weight >= MIN_INSERT_WEIGHT, at its pose(s).

        Insertions are ordered by half-set, class and angle, so that each chunk's insertions at a common pose are
        summed by the accumulator and interpolated once.
        """
        xp = self.xp
        member, cls, angle, shift, weight = insertions(alignment, weights)
        order = np.lexsort((angle, cls, batch.half[member]))
        member, cls, angle, shift, weight = member[order], cls[order], angle[order], shift[order], weight[order]
        flat = self.coefficients.flat[: batch.coefficients.shape[1]]
        for start in range(0, member.size, _INSERT_CHUNK):
            chunk = slice(start, start + _INSERT_CHUNK)
            rows = member[chunk]
            on_device = xp.asarray(rows)
            # Undo each particle's shift; one of each Friedel pair is inserted (the accumulator symmetrises).
            ramps = pair_ramps(xp.asarray(shift[chunk].astype(np.float64)), self.box_px, flat)
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

    def update(
        self,
        state: ClassificationState,
        sums: tuple[np.ndarray, np.ndarray],
        eta: float,
        occupancy: np.ndarray,
        alignment: Alignment,
        *,
        recenter: bool,
    ) -> ClassificationState:
        """The state after moving by ``eta`` towards the new ``sums`` (2, K, P, P) and ``occupancy`` (K,): running
        sums, half-set FRC, Wiener class averages, mask, re-centring, noise (from ``alignment``'s residuals) and
        resolution."""
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
        averages = reconstruct_from_sums(
            data.sum(axis=0), weight.sum(axis=0), self.box_px, 2,
            fsc=full_data_fsc(frc), tau2_fudge=DEFAULT_TAU2_FUDGE_2D,
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

    def split(self, state: ClassificationState, source: int, target: int) -> None:
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


def insertions(
    alignment: Alignment, weights: np.ndarray
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
