"""Metrics against ground truth, for tests and benchmarks: clusterings, latent coordinates, class occupancy,
pose errors and map resolution after rigid alignment with a hand check.

Pose conventions follow :mod:`cryostack.core.geometry`: a pose is RELION's matrix A, which maps volume
coordinates into the particle's frame (``P_A(x, y) = ∫ V(Aᵀ (x, y, z)) dz``). A map reconstructed in another
frame, ``V'(r) = V(Gᵀ r)``, is consistent with the poses ``A·Gᵀ``, so two pose sets of the same particles agree
up to one rotation multiplied on the right; a map of the opposite hand is consistent with ``M·A·M`` (then a
right rotation), ``M = diag(1, 1, −1)``, because a projection is unchanged when the volume is mirrored along the
projection direction.

Map transforms act on ``(x, y, z)`` coordinates about the box centre ``D // 2`` of arrays indexed ``[z, y, x]``
(:mod:`cryostack.core.fourier`): :func:`transform_map` with rotation R, shift t and ``flip`` returns
``W(x) = V(F · Rᵀ · (x − t))``, ``F = diag(1, 1, −1)`` when flipped (else the identity): V mirrored through the
z = 0 plane, rotated by R, then translated by t.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.fft
import scipy.optimize
import scipy.stats
from scipy import ndimage
from scipy.spatial.transform import Rotation

from cryostack.core.backend import fft_workers, to_host
from cryostack.core.fourier import fft3_centered
from cryostack.core.fsc import REFERENCE_THRESHOLD, fsc_curve, resolution_at_threshold
from cryostack.core.poses import rotation_angle_deg, so3_grid_matrices, so3_step_deg
from cryostack.core.projection import gridding_correction
from cryostack.errors import InvalidArgumentError

_MIRROR = np.diag([1.0, 1.0, -1.0])  # reflection through the z = 0 plane, in (x, y, z)
_XYZ_TO_INDEX = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # (x, y, z) <-> [z, y, x]


def adjusted_rand_index(labels_true: np.ndarray, labels_pred: np.ndarray) -> float:
    """Adjusted Rand index of two labelings of the same items (1 = identical partitions, ~0 = chance)."""
    table = contingency_table(labels_true, labels_pred).astype(np.float64)
    n = table.sum()
    pairs_joint = _pairs(table).sum()
    pairs_true = _pairs(table.sum(axis=1)).sum()
    pairs_pred = _pairs(table.sum(axis=0)).sum()
    expected = pairs_true * pairs_pred / _pairs(n) if n > 1 else 0.0
    maximum = 0.5 * (pairs_true + pairs_pred)
    if maximum == expected:
        # Both partitions are trivial the same way (one cluster each, or every item alone): they agree.
        return 1.0
    return float((pairs_joint - expected) / (maximum - expected))


def _pairs(counts: np.ndarray | float) -> np.ndarray | float:
    """Number of unordered pairs ``n (n − 1) / 2`` of each count."""
    return counts * (counts - 1) / 2.0


def normalized_mutual_information(labels_true: np.ndarray, labels_pred: np.ndarray) -> float:
    """Mutual information of two labelings divided by the arithmetic mean of their entropies (0 .. 1)."""
    table = contingency_table(labels_true, labels_pred).astype(np.float64)
    n = table.sum()
    rows = table.sum(axis=1)  # (I,)
    cols = table.sum(axis=0)  # (J,)
    i, j = np.nonzero(table)
    joint = table[i, j] / n
    mutual = float(np.sum(joint * (np.log(table[i, j] * n) - np.log(rows[i] * cols[j]))))
    entropy_true = float(-np.sum((rows / n) * np.log(rows / n)))
    entropy_pred = float(-np.sum((cols / n) * np.log(cols / n)))
    mean_entropy = 0.5 * (entropy_true + entropy_pred)
    if mean_entropy == 0.0:
        return 1.0  # both labelings put every item in one cluster: identical partitions
    return max(0.0, mutual) / mean_entropy


def contingency_table(labels_true: np.ndarray, labels_pred: np.ndarray) -> np.ndarray:
    """Counts ``(I, J)`` int64 of items with true label i and predicted label j (labels in sorted order)."""
    a = np.asarray(to_host(labels_true)).ravel()
    b = np.asarray(to_host(labels_pred)).ravel()
    if a.shape != b.shape:
        raise InvalidArgumentError("labels_pred", f"has {b.size} labels, labels_true {a.size}")
    if a.size == 0:
        raise InvalidArgumentError("labels_true", "must not be empty")
    _, a_index = np.unique(a, return_inverse=True)
    _, b_index = np.unique(b, return_inverse=True)
    n_a, n_b = int(a_index.max()) + 1, int(b_index.max()) + 1
    return np.bincount(a_index * n_b + b_index, minlength=n_a * n_b).reshape(n_a, n_b)


def spearman_correlation(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation of two paired samples (e.g. a latent coordinate and the true hinge angle)."""
    a = np.asarray(to_host(x), dtype=np.float64).ravel()
    b = np.asarray(to_host(y), dtype=np.float64).ravel()
    if a.shape != b.shape or a.size < 2:
        raise InvalidArgumentError("y", f"needs as many values as x (at least 2), got {b.size} and {a.size}")
    return float(scipy.stats.spearmanr(a, b).statistic)


@dataclass(frozen=True)
class ClassOccupancy:
    """How particles spread over classes."""

    counts: np.ndarray  # (K,) int64 particles per class
    n_empty: int  # classes with no particle
    n_tiny: int  # non-empty classes below tiny_fraction · N / K
    min_count: int
    max_count: int
    gini: float  # 0 for equal occupancy, → 1 when one class holds everything


def class_occupancy(labels: np.ndarray, n_classes: int, tiny_fraction: float = 0.1) -> ClassOccupancy:
    """Occupancy statistics of hard class labels in ``[0, n_classes)``."""
    values = np.asarray(to_host(labels)).ravel()
    if n_classes < 1:
        raise InvalidArgumentError("n_classes", f"must be at least 1, got {n_classes}")
    if values.size and (values.min() < 0 or values.max() >= n_classes):
        raise InvalidArgumentError("labels", f"must lie in [0, {n_classes})")
    counts = np.bincount(values.astype(np.int64), minlength=n_classes)
    tiny_limit = tiny_fraction * values.size / n_classes
    return ClassOccupancy(
        counts=counts,
        n_empty=int(np.sum(counts == 0)),
        n_tiny=int(np.sum((counts > 0) & (counts < tiny_limit))),
        min_count=int(counts.min()),
        max_count=int(counts.max()),
        gini=gini_coefficient(counts),
    )


def class_purity(labels_pred: np.ndarray, labels_true: np.ndarray, n_classes: int) -> np.ndarray:
    """Per predicted class, the fraction of its members that share its most common true label: (K,), NaN if empty."""
    table = contingency_table(np.asarray(to_host(labels_true)).ravel(), np.asarray(to_host(labels_pred)).ravel())
    predicted = np.unique(np.asarray(to_host(labels_pred)).ravel())  # the columns of `table`, sorted
    purity = np.full(n_classes, np.nan)
    sizes = table.sum(axis=0)
    purity[predicted.astype(np.int64)] = table.max(axis=0) / sizes
    return purity


def gini_coefficient(values: np.ndarray) -> float:
    """Gini coefficient of non-negative values (0 = all equal)."""
    x = np.sort(np.asarray(values, dtype=np.float64).ravel())
    total = x.sum()
    if x.size == 0 or total == 0:
        return 0.0
    ranks = np.arange(1, x.size + 1)
    return float(2.0 * np.sum(ranks * x) / (x.size * total) - (x.size + 1) / x.size)


@dataclass(frozen=True)
class RotationError:
    """Errors of estimated poses against true ones after the best global rotation (and hand)."""

    median_deg: float
    mean_deg: float
    per_particle_deg: np.ndarray  # (N,) geodesic angle between estimate and aligned truth
    median_direction_deg: float  # median angle between viewing directions (ignores the in-plane angle)
    global_rotation: np.ndarray  # (3, 3) G with estimate ≈ truth·G (M·truth·M·G when flipped)
    flipped: bool  # True when the estimates match the mirrored hand better


def rotation_error(rotations_est: np.ndarray, rotations_true: np.ndarray, *, allow_flip: bool = False) -> RotationError:
    """Geodesic pose errors ``(N, 3, 3)`` vs ``(N, 3, 3)`` up to a global right rotation (and optionally the hand)."""
    est = np.asarray(to_host(rotations_est), dtype=np.float64)
    true = np.asarray(to_host(rotations_true), dtype=np.float64)
    if est.ndim != 3 or est.shape[1:] != (3, 3) or est.shape != true.shape:
        raise InvalidArgumentError("rotations_est", f"expected (N, 3, 3) like the truth, got {est.shape}, {true.shape}")
    candidates = [(False, true)]
    if allow_flip:
        candidates.append((True, _MIRROR @ true @ _MIRROR))
    results = []
    for flipped, reference in candidates:
        rotation, errors = _robust_global_rotation(est, reference)
        aligned = reference @ rotation  # (N, 3, 3)
        # The third row of A is the viewing direction in volume coordinates.
        direction_cos = np.clip(np.einsum("ni,ni->n", aligned[:, 2], est[:, 2]), -1.0, 1.0)
        results.append(
            RotationError(
                median_deg=float(np.median(errors)),
                mean_deg=float(np.mean(errors)),
                per_particle_deg=errors,
                median_direction_deg=float(np.median(np.degrees(np.arccos(direction_cos)))),
                global_rotation=rotation,
                flipped=flipped,
            )
        )
    return min(results, key=lambda result: result.median_deg)


def _robust_global_rotation(est: np.ndarray, true: np.ndarray, iterations: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """G minimising the pose errors of ``est ≈ true · G``: chordal least squares, then refit on the inliers."""
    weights = np.ones(est.shape[0])
    rotation = np.eye(3)
    for _ in range(iterations):
        rotation = _project_to_rotation(np.einsum("n,nji,njk->ik", weights, true, est))
        errors = rotation_angle_deg(true @ rotation, est)
        # Wrong poses (a few, or many early in a refinement) should not pull the global rotation around.
        threshold = max(3.0 * float(np.median(errors)), 5.0)
        new_weights = (errors <= threshold).astype(np.float64)
        if not new_weights.any() or np.array_equal(new_weights, weights):
            break
        weights = new_weights
    return rotation, rotation_angle_deg(true @ rotation, est)


def _project_to_rotation(matrix: np.ndarray) -> np.ndarray:
    """The rotation nearest to ``matrix`` in the Frobenius norm (polar factor with det +1)."""
    u, _, vt = np.linalg.svd(matrix)
    d = np.sign(np.linalg.det(u @ vt)) or 1.0
    return u @ np.diag([1.0, 1.0, d]) @ vt


def transform_map(
    volume: np.ndarray,
    rotation: np.ndarray,
    shift_px: np.ndarray = (0.0, 0.0, 0.0),
    *,
    flip: bool = False,
    order: int = 3,
) -> np.ndarray:
    """``W(x) = V(F · Rᵀ · (x − t))`` of a ``(D, D, D)`` map: mirror (optional), rotate, translate."""
    vol = np.asarray(to_host(volume), dtype=np.float32)
    if vol.ndim != 3 or len(set(vol.shape)) != 1:
        raise InvalidArgumentError("volume", f"expected a cubic (D, D, D) map, got {vol.shape}")
    matrix, offset = _index_affine(vol.shape[0], np.asarray(rotation, dtype=np.float64), shift_px, flip)
    return ndimage.affine_transform(vol, matrix, offset=offset, order=order, mode="constant", cval=0.0).astype(
        np.float32
    )


def _index_affine(box: int, rotation: np.ndarray, shift_px: np.ndarray, flip: bool) -> tuple[np.ndarray, np.ndarray]:
    """Matrix and offset for ``ndimage.affine_transform`` (index space ``[z, y, x]``) of :func:`transform_map`."""
    source = (_MIRROR if flip else np.eye(3)) @ rotation.T  # (x, y, z) output -> source coordinates
    matrix = _XYZ_TO_INDEX @ source @ _XYZ_TO_INDEX
    center = np.full(3, box // 2, dtype=np.float64)
    offset = center - matrix @ center - _XYZ_TO_INDEX @ source @ np.asarray(shift_px, dtype=np.float64)
    return matrix, offset


@dataclass(frozen=True)
class MapAlignment:
    """A map rigidly aligned onto a reference: ``aligned = transform_map(moving, rotation, shift_px, flip)``."""

    aligned_map: np.ndarray  # (D, D, D) float32
    rotation: np.ndarray  # (3, 3) float64
    shift_px: np.ndarray  # (3,) float64, (x, y, z)
    flipped: bool  # True when the moving map had the opposite hand
    correlation: float  # normalised real-space correlation with the reference after alignment


@dataclass(frozen=True)
class MapComparison:
    """A map against a ground-truth reference after rigid alignment and hand check."""

    alignment: MapAlignment
    fsc: np.ndarray  # (D // 2 + 1,) float64, aligned map vs reference
    resolution_a: float  # where the FSC falls below 0.5


def compare_to_reference(
    volume: np.ndarray, reference: np.ndarray, pixel_size_a: float, *, allow_flip: bool = True
) -> MapComparison:
    """Align ``volume`` onto ``reference`` (either hand), then their FSC and its 0.5-threshold resolution."""
    ref = np.asarray(to_host(reference), dtype=np.float32)
    alignment = align_map(volume, ref, allow_flip=allow_flip)
    curve = np.asarray(to_host(fsc_curve(alignment.aligned_map, ref)))
    resolution = resolution_at_threshold(curve, ref.shape[0], pixel_size_a, REFERENCE_THRESHOLD)
    return MapComparison(alignment=alignment, fsc=curve, resolution_a=resolution)


def align_map(
    moving: np.ndarray,
    reference: np.ndarray,
    *,
    allow_flip: bool = True,
    coarse_level: int = 1,
    n_candidates: int = 8,
) -> MapAlignment:
    """Rigidly align ``moving`` onto ``reference`` (both ``(D, D, D)``), trying both hands.

    Global search: every rotation of the SO(3) grid at ``coarse_level``, each with its best translation from an
    FFT cross-correlation, on the maps' low frequencies. Local refinement: the best ``n_candidates`` per hand are
    polished by a simplex search over rotation and continuous translation while the frequency limit rises; the
    hand whose best pose correlates best wins.
    """
    mov = np.asarray(to_host(moving), dtype=np.float32)
    ref = np.asarray(to_host(reference), dtype=np.float32)
    if mov.ndim != 3 or len(set(mov.shape)) != 1 or mov.shape != ref.shape:
        raise InvalidArgumentError("moving", f"expected cubic maps of one shape, got {mov.shape} and {ref.shape}")
    box = mov.shape[0]
    objective = _FourierObjective(mov, ref)
    coarse = so3_grid_matrices(coarse_level)  # (R, 3, 3)
    # Frequency limits in Fourier pixels. Past about 16 shells, trilinear interpolation error grows as fast as the
    # angular information, so going further costs time without gaining precision (about 0.05° already).
    coarse_radius = max(3.0, min(8.0, box / 8.0))
    fine_radius = max(coarse_radius, min(16.0, box / 4.0))

    contenders = []
    for flip in (False, True) if allow_flip else (False,):
        scores, shifts = objective.translation_search(coarse, flip, coarse_radius)
        picks = _distinct_peaks(coarse, scores, n_candidates, 1.5 * so3_step_deg(coarse_level))
        poses = [(coarse[i], shifts[i]) for i in picks]
        for radius, keep, rotation_step_deg, shift_step_px, tolerance_deg in (
            (coarse_radius, 2, 10.0, 2.0, 1.0),
            (fine_radius, 1, 2.0, 0.5, 0.05),
        ):
            polished = sorted(
                (
                    objective.polish(r, t, flip, radius, rotation_step_deg, shift_step_px, tolerance_deg)
                    for r, t in poses
                ),
                key=lambda item: -item[0],
            )
            poses = [(r, t) for _, r, t in polished[:keep]]
        contenders.append((polished[0][0], flip, *poses[0]))
    _, flip, rotation, shift = max(contenders, key=lambda item: item[0])

    aligned = transform_map(mov, rotation, shift, flip=flip)
    return MapAlignment(
        aligned_map=aligned,
        rotation=rotation,
        shift_px=shift,
        flipped=flip,
        correlation=_normalised_correlation(aligned, ref),
    )


def _distinct_peaks(rotations: np.ndarray, scores: np.ndarray, count: int, separation_deg: float) -> list[int]:
    """Indices of up to ``count`` best-scoring rotations, each at least ``separation_deg`` from those before it.

    Neighbours of one correlation peak would otherwise fill every slot, and a map with (pseudo)symmetry has
    several peaks of which the best on the coarse grid need not be the best after refinement.
    """
    picks: list[int] = []
    for index in np.argsort(-scores):
        if all(rotation_angle_deg(rotations[index], rotations[p]) >= separation_deg for p in picks):
            picks.append(int(index))
            if len(picks) == count:
                break
    return picks


class _FourierObjective:
    """Correlation of the reference with the moving map rotated and shifted, over frequencies up to a radius.

    The moving map's transform is sampled at rotated frequencies by trilinear interpolation from a 2x zero-padded,
    gridding-corrected transform (as in projection); translations are exact phase ramps, so they are continuous.
    """

    def __init__(self, moving: np.ndarray, reference: np.ndarray) -> None:
        box = moving.shape[0]
        padded_box = 2 * box
        corrected = moving / gridding_correction(box, padded_box, 3)
        padded = np.zeros((padded_box,) * 3, dtype=np.float32)
        start = padded_box // 2 - box // 2
        padded[start : start + box, start : start + box, start : start + box] = corrected
        table = np.asarray(fft3_centered(padded), dtype=np.complex64)  # (P, P, P)
        # Two periodic planes per axis so every trilinear neighbour of a position within Nyquist exists.
        self.table = np.pad(table, ((0, 2), (0, 2), (0, 2)), mode="wrap")  # (P + 2,)*3
        self.center = padded_box // 2
        self.box = box
        self.reference_ft = np.asarray(fft3_centered(reference), dtype=np.complex64)  # (D, D, D)
        self._points: dict[tuple[float, bool], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def points(self, radius: float, half: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Integer frequencies ``(C, 3)`` (kx, ky, kz) inside ``radius`` (kz >= 0 when ``half``), the reference
        there and each point's weight (2 for a point standing for itself and its Friedel mate)."""
        key = (radius, half)
        if key not in self._points:
            k = np.arange(self.box) - self.box // 2
            kz, ky, kx = np.meshgrid(k, k, k, indexing="ij")
            inside = kx**2 + ky**2 + kz**2 <= radius**2
            if half:
                inside &= kz >= 0
            freqs = np.stack([kx[inside], ky[inside], kz[inside]], axis=1)
            weights = np.where(half & (freqs[:, 2] > 0), 2.0, 1.0).astype(np.float32)
            self._points[key] = (freqs, self.reference_ft[inside], weights)
        return self._points[key]

    def sample(self, rotations: np.ndarray, flip: bool, freqs: np.ndarray) -> np.ndarray:
        """The moving map's transform at ``Q k``, ``Q = F·Rᵀ``, for rotations ``(B, 3, 3)``: ``(B, C)`` complex64."""
        # W(x) = V(Q x) has the transform Ŵ(k) = V̂(Q k); the padded table holds V̂ at twice the frequency index.
        # Rows reversed so the product comes out in [z, y, x] order; doubled for the padded table.
        source = (2.0 * ((_MIRROR if flip else np.eye(3)) @ rotations.transpose(0, 2, 1)))[:, ::-1, :]  # (B, 3, 3)
        positions = freqs.astype(np.float32) @ source.transpose(0, 2, 1).astype(np.float32) + np.float32(self.center)
        base = np.floor(positions)
        frac = positions - base
        extent = self.table.shape[0]
        flat_base = ((base[..., 0] * extent + base[..., 1]) * extent + base[..., 2]).astype(np.int64)
        flat = self.table.ravel()
        result = np.zeros(flat_base.shape, dtype=np.complex64)
        for dz in (0, 1):
            wz = frac[..., 0] if dz else 1.0 - frac[..., 0]
            for dy in (0, 1):
                wzy = wz * (frac[..., 1] if dy else 1.0 - frac[..., 1])
                for dx in (0, 1):
                    weight = wzy * (frac[..., 2] if dx else 1.0 - frac[..., 2])
                    result += weight * flat[flat_base + ((dz * extent + dy) * extent + dx)]
        return result

    def score(self, rotation: np.ndarray, shift_px: np.ndarray, flip: bool, radius: float) -> float:
        """Normalised correlation of ``transform_map(moving, rotation, shift_px, flip)`` with the reference."""
        freqs, reference, weights = self.points(radius, half=True)
        values = self.sample(rotation[None], flip, freqs)[0]
        # A translation by t multiplies coefficient k by exp(−2πi k·t / D), a product of one factor per axis.
        index = freqs + self.box // 2
        axis = np.arange(self.box) - self.box // 2
        ramps = np.exp(-2j * np.pi * np.outer(np.asarray(shift_px, dtype=np.float64), axis) / self.box)
        ramps = ramps.astype(np.complex64)  # (3, D)
        values *= ramps[0, index[:, 0]] * ramps[1, index[:, 1]] * ramps[2, index[:, 2]]
        numerator = np.sum(weights * (np.conj(reference) * values).real)
        power = np.sum(weights * (reference.real**2 + reference.imag**2)) * np.sum(
            weights * (values.real**2 + values.imag**2)
        )
        return float(numerator / np.sqrt(power + 1e-30))

    def translation_search(
        self, rotations: np.ndarray, flip: bool, radius: float, batch: int = 256
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per rotation: the best normalised correlation over translations (on a grid of ``D / n`` pixels, ``n``
        just above twice the radius) and that translation ``(x, y, z)`` in pixels."""
        freqs, reference, _ = self.points(radius, half=False)
        n = 2 * int(np.ceil(radius)) + 2
        grid_index = tuple(np.mod(freqs[:, axis], n) for axis in (2, 1, 0))  # [z, y, x] of each k, wrapped
        reference_norm = np.sqrt(np.sum(np.abs(reference) ** 2))
        scores = np.empty(rotations.shape[0])
        shifts = np.empty((rotations.shape[0], 3))
        for start in range(0, rotations.shape[0], batch):
            values = self.sample(rotations[start : start + batch], flip, freqs)  # (B, C)
            grid = np.zeros((values.shape[0], n, n, n), dtype=np.complex64)
            grid[:, grid_index[0], grid_index[1], grid_index[2]] = np.conj(reference) * values
            # Σ_k conj(R̂) Ŵ exp(−2πi k·t / D) at t = j·D/n is a forward FFT of the product on the n-grid.
            cc = scipy.fft.fftn(grid, axes=(1, 2, 3), workers=fft_workers()).real.reshape(values.shape[0], -1)
            peak = np.argmax(cc, axis=1)
            norms = np.sqrt(np.sum(np.abs(values) ** 2, axis=1))
            scores[start : start + values.shape[0]] = cc[np.arange(values.shape[0]), peak] / (
                norms * reference_norm + 1e-30
            )
            index = np.stack(np.unravel_index(peak, (n, n, n)), axis=1)  # (B, 3) [z, y, x]
            shifts[start : start + values.shape[0]] = (((index + n // 2) % n - n // 2) * (self.box / n))[:, ::-1]
        return scores, shifts

    def polish(
        self,
        rotation: np.ndarray,
        shift_px: np.ndarray,
        flip: bool,
        radius: float,
        rotation_step_deg: float,
        shift_step_px: float,
        tolerance_deg: float,
    ) -> tuple[float, np.ndarray, np.ndarray]:
        """Nelder–Mead over (rotation vector, translation) around a pose; returns (score, rotation, shift).

        The simplex starts ``rotation_step_deg`` / ``shift_step_px`` wide and stops when it is ``tolerance_deg``
        (and as many pixels) across and the correlation no longer changes.
        """

        def pose(params: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            delta = Rotation.from_rotvec(np.radians(params[:3])).as_matrix()
            return delta @ rotation, shift_px + params[3:]

        def loss(params: np.ndarray) -> float:
            return -self.score(*pose(params), flip, radius)

        simplex = np.zeros((7, 6))
        simplex[1:4, :3] = rotation_step_deg * np.eye(3)
        simplex[4:, 3:] = shift_step_px * np.eye(3)
        result = scipy.optimize.minimize(
            loss,
            np.zeros(6),
            method="Nelder-Mead",
            options={"initial_simplex": simplex, "xatol": tolerance_deg, "fatol": 1e-5, "maxfev": 300},
        )
        best_rotation, best_shift = pose(result.x)
        return -float(result.fun), best_rotation, best_shift


def _normalised_correlation(a: np.ndarray, b: np.ndarray) -> float:
    x = a.astype(np.float64) - a.mean()
    y = b.astype(np.float64) - b.mean()
    return float(np.sum(x * y) / np.sqrt(np.sum(x * x) * np.sum(y * y)))
