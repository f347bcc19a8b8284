"""Fourier-slice projection, its exact adjoint (back-projection) and Fourier accumulators, in 3D and 2D.

Projection (3D). A :class:`Projector` zero-pads a real D³ volume to ``P = pad_factor · D`` voxels (origin kept at
the centre pixel), divides it by the real-space transform of the trilinear kernel (gridding correction:
``sinc²(x / P)`` per axis, ``x`` the coordinate from the origin) and takes one centred FFT. A projection at the
RELION matrix A (see :mod:`cryostack.core.geometry`) is then read off at the 3D positions
``pad_factor · (kx·A[0] + ky·A[1])`` by trilinear interpolation, for every 2D coefficient ``(ky, kx)`` of the
centred D×D grid (:mod:`cryostack.core.fourier`) with ``|k| <= D / 2``; coefficients in the corners beyond are 0.
The result is the centred 2D transform of the line integral of the volume along z, on the same scale as
``fft2_centered`` of a real-space projection. (Exactly on grid points, such as DC, trilinear interpolation returns
the gridding-corrected table itself: the DC is the sum of ``v / sinc²``, a few percent above the plain sum for a
map that reaches the box edge. RELION's projector shares this; its images match ours in scale.)

The transform of a real volume is Hermitian, and trilinear interpolation keeps that symmetry, so only one of
each pair of Friedel mates ``(k, -k)`` is interpolated and the other is its complex conjugate; this halves the
work of projection and of every adjoint.

Periodicity. Positions up to ``|k| = D / 2`` touch the last plane of the padded transform, whose upper
neighbour is its periodic image (the DFT is periodic); the stored table therefore carries two wrapped planes per
axis, and accumulators fold theirs back, so no coefficient is clipped.

Back-projection. :func:`backproject` is the exact adjoint of :meth:`Projector.project` for the real inner
product ``<a, b> = Re Σ conj(a)·b``: ``<P v, x> = <v, Pᵀ x>`` to float32 rounding. :class:`FourierAccumulator`
is the form used by reconstruction: it inserts slices and their weights (trilinear, scattered) into padded 3D
Fourier accumulators and returns their folded, Hermitian-symmetrised sums.

2D. :class:`Projector2D` rotates the transforms of K real images (class averages) by in-plane rotations
(bilinear interpolation from a 2x-padded transform with the 2D gridding correction), with the adjoint
:func:`backrotate_2d` and the per-class accumulator :class:`FourierAccumulator2D`, which sums the rows of an insertion
that share a class and a rotation before interpolating them (the interpolation is linear).

Coefficient subsets. Every method takes ``coefficients``: ``None`` for the full D×D grid, a boolean (D, D) mask,
or flat indices (C,) into the centred D×D grid; with a subset, slices are (M, C) in that order.

Backends. All arrays follow the device of the inputs (numpy or cupy); work is chunked over rotations to bound
memory (``chunk_elements`` interpolated coefficients at a time).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import scipy.sparse

from cryostack.core.backend import array_module, to_host
from cryostack.core.fourier import (
    coefficient_frequencies,
    coefficient_indices,
    fft2_centered,
    fft3_centered,
    ifft2_centered,
    ifft3_centered,
)
from cryostack.errors import InvalidArgumentError

# Interpolated coefficients per chunk: large enough to amortise Python overhead, small enough for cache/memory.
DEFAULT_CHUNK_ELEMENTS = 1 << 17


def gridding_correction(box_px: int, padded_box_px: int, ndim: int, xp: ModuleType = np) -> Any:
    """Real-space transform of the (bi/tri)linear kernel on a P-padded grid: ``Π sinc²(x / P)``, (D,)*ndim."""
    x = (xp.arange(box_px) - box_px // 2).astype(np.float64) / padded_box_px
    s = (xp.sinc(x) ** 2).astype(np.float32)
    if ndim == 2:
        return s[:, None] * s[None, :]
    if ndim == 3:
        return s[:, None, None] * s[None, :, None] * s[None, None, :]
    raise InvalidArgumentError("ndim", f"must be 2 or 3, got {ndim}")


@dataclass(frozen=True)
class _SlicePlan:
    """Which requested coefficients are interpolated directly and which are Friedel mates of those."""

    box_px: int
    n_coefficients: int  # C
    kx: Any  # (S,) float32 frequencies of the directly interpolated coefficients
    ky: Any  # (S,) float32
    expand_index: Any  # (C,) into [values (S), conj(values) (S), 0]: builds the request from the S values
    direct: Any  # (S,) positions in the request of the directly interpolated coefficients
    fold_mate: Any  # (S,) position in the request of each one's Friedel mate, or C when it has none
    full_grid: bool
    # (C,) position in the request of (−ky, kx) = A(90°)ᵀk for each coefficient k, or None when the request does not
    # hold every such image: a slice at A·A(90°) is then the slice at A taken at these positions.
    quarter_turn: Any


def _make_plan(box_px: int, coefficients: Any, xp: ModuleType) -> _SlicePlan:
    """Plan a slice over a coefficient request (None = full grid, cached); built on the host, moved to ``xp``."""
    if coefficients is None:
        return _full_grid_plan(box_px, xp)
    return _build_plan(box_px, coefficients, xp)


@functools.lru_cache(maxsize=16)
def _full_grid_plan(box_px: int, xp: ModuleType) -> _SlicePlan:
    """The plan of the full D×D grid (its arrays are never written to)."""
    return _build_plan(box_px, None, xp)


def _build_plan(box_px: int, coefficients: Any, xp: ModuleType) -> _SlicePlan:
    """Build a slice plan (see :func:`_make_plan`)."""
    full = coefficients is None
    if full:
        flat = np.arange(box_px * box_px)
    else:
        flat = to_host(coefficient_indices(box_px, coefficients))
    ky, kx = coefficient_frequencies(box_px, flat)
    inside = 4 * (kx * kx + ky * ky) <= box_px * box_px
    half = box_px // 2
    pos_of = np.full(box_px * box_px, -1, dtype=np.int64)
    pos_of[flat] = np.arange(flat.size)
    mate_y, mate_x = -ky + half, -kx + half
    mate_in_box = (mate_y >= 0) & (mate_y < box_px) & (mate_x >= 0) & (mate_x < box_px)
    mate_pos = np.where(mate_in_box, pos_of[np.clip(mate_y * box_px + mate_x, 0, box_px * box_px - 1)], -1)
    positive = (ky > 0) | ((ky == 0) & (kx >= 0))
    direct_mask = inside & (positive | (mate_pos < 0))
    mirrored = inside & ~direct_mask
    direct = np.flatnonzero(direct_mask)
    n_direct = direct.size
    slot_of = np.full(flat.size, -1, dtype=np.int64)
    slot_of[direct] = np.arange(n_direct)
    expand_index = np.full(flat.size, 2 * n_direct, dtype=np.int64)
    expand_index[direct] = np.arange(n_direct)
    mirror_dst = np.flatnonzero(mirrored)
    expand_index[mirror_dst] = n_direct + slot_of[mate_pos[mirror_dst]]
    fold_mate = np.full(n_direct, flat.size, dtype=np.int64)
    fold_mate[slot_of[mate_pos[mirror_dst]]] = mirror_dst
    turned_y, turned_x = kx + half, -ky + half
    turned_in_box = (turned_x >= 0) & (turned_x < box_px)  # turned_y = kx + half always lies in the box
    turned_pos = np.where(turned_in_box, pos_of[np.clip(turned_y * box_px + turned_x, 0, box_px * box_px - 1)], -1)
    quarter_turn = xp.asarray(turned_pos) if bool(np.all(turned_pos >= 0)) else None
    return _SlicePlan(
        box_px=box_px,
        n_coefficients=int(flat.size),
        kx=xp.asarray(kx[direct].astype(np.float32)),
        ky=xp.asarray(ky[direct].astype(np.float32)),
        expand_index=xp.asarray(expand_index),
        direct=xp.asarray(direct),
        fold_mate=xp.asarray(fold_mate),
        full_grid=full,
        quarter_turn=quarter_turn,
    )


def _expand(plan: _SlicePlan, values: Any) -> Any:
    """Directly interpolated values (..., S) to the requested layout (..., D, D) or (..., C), mates conjugated."""
    xp = array_module(values)
    zero = xp.zeros(values.shape[:-1] + (1,), dtype=values.dtype)
    out = xp.take(xp.concatenate([values, xp.conj(values), zero], axis=-1), plan.expand_index, axis=-1)
    if plan.full_grid:
        return out.reshape(values.shape[:-1] + (plan.box_px, plan.box_px))
    return out


def _fold(plan: _SlicePlan, slices: Any, conjugate: bool) -> Any:
    """Adjoint of :func:`_expand`: (..., D, D) or (..., C) to (..., S), mates added (conjugated if complex)."""
    xp = array_module(slices)
    flat = slices.reshape(slices.shape[:-2] + (-1,)) if plan.full_grid else slices
    if flat.shape[-1] != plan.n_coefficients:
        raise InvalidArgumentError("slices", f"expected {plan.n_coefficients} coefficients, got {flat.shape[-1]}")
    padded = xp.concatenate([flat, xp.zeros(flat.shape[:-1] + (1,), dtype=flat.dtype)], axis=-1)
    mates = xp.take(padded, plan.fold_mate, axis=-1)
    return xp.take(padded, plan.direct, axis=-1) + (xp.conj(mates) if conjugate else mates)


def _corner_offsets(ext: int, ndim: int) -> list[int]:
    """Flat offsets of the 2**ndim interpolation corners in a C-ordered table of side ``ext``."""
    strides = [ext**axis for axis in range(ndim)]  # x, y[, z] strides
    offsets = []
    for corner in range(2**ndim):
        offsets.append(sum(strides[axis] for axis in range(ndim) if corner >> axis & 1))
    return offsets


def _corners(positions: list[Any], ext: int) -> tuple[Any, list[Any]]:
    """Base flat index (M, S) and corner weights of positions given per axis (x, y[, z]) as (M, S) arrays."""
    xp = array_module(positions[0])
    bases, pairs = [], []
    for u in positions:
        base = xp.floor(u)
        frac = u - base
        bases.append(base.astype(np.int64))
        pairs.append((1 - frac, frac))
    lin = bases[-1]
    for base in bases[-2::-1]:
        lin = lin * ext + base
    # Weights of the corners in the order of _corner_offsets (bit a of the corner number = +1 along axis a).
    weights = [pairs[0][0], pairs[0][1]]
    for axis_pair in pairs[1:]:
        weights = [w * a for a in axis_pair for w in weights]
    return lin, weights


def _gather(table: Any, ext: int, positions: list[Any]) -> Any:
    """Interpolate tables (B, ext**ndim) at positions given per axis as (M, S) index-unit arrays: (B, M, S)."""
    xp = array_module(table)
    lin, weights = _corners(positions, ext)
    single = table.shape[0] == 1
    out = None
    for offset, weight in zip(_corner_offsets(ext, len(positions)), weights, strict=True):
        # A view starting at the corner offset avoids building lin + offset for every corner.
        term = xp.take(table[0, offset:], lin)[None] if single else xp.take(table[:, offset:], lin, axis=1)
        term *= weight
        if out is None:
            out = term
        else:
            out += term
    return out


def _scatter_add(acc: Any, index: Any, values: Any) -> None:
    """``acc[index] += values`` with repeated indices summed (flat arrays, same device)."""
    xp = array_module(acc)
    if xp is np:
        np.add.at(acc, index, values)
        return
    if xp.iscomplexobj(acc):  # CUDA's atomic add is real: the two parts go through a real view
        real_view = acc.view(np.float32 if acc.dtype == np.complex64 else np.float64)
        xp.add.at(real_view, 2 * index, values.real.astype(real_view.dtype))
        xp.add.at(real_view, 2 * index + 1, values.imag.astype(real_view.dtype))
    else:
        xp.add.at(acc, index, values.astype(acc.dtype))


def _scatter(
    accumulators: list[Any], values: list[Any], ext: int, positions: list[Any], batch_offset: Any
) -> None:
    """Add values (M, S) at positions (per axis, (M, S)) into flat accumulators by (bi/tri)linear weights.

    ``batch_offset`` (M,) int selects, per row, the block (class) of the flat accumulator, or is None.
    """
    lin, weights = _corners(positions, ext)
    if batch_offset is not None:
        lin = lin + batch_offset[:, None]
    lin = lin.ravel()
    for offset, weight in zip(_corner_offsets(ext, len(positions)), weights, strict=True):
        w = weight.ravel()
        for acc, vals in zip(accumulators, values, strict=True):
            _scatter_add(acc[offset:], lin, vals.ravel() * w)


def _merge_equal_poses(values: list[Any], rotations: Any, class_index: Any) -> tuple[list[Any], Any, Any]:
    """Rows of ``values`` (each (M, ...)) that share a class and a rotation, summed into one row per pair.

    Interpolation is linear, so inserting such a sum once adds what inserting its rows would (to float32 rounding)
    with one scatter instead of many. Returns the merged values (G, ...) and the rotations (G, 2, 2) and classes
    (G,) of the pairs, or the inputs unchanged when every row has a pair of its own.
    """
    xp = array_module(rotations)
    keys = np.concatenate([to_host(class_index)[:, None].astype(np.float64), to_host(rotations).reshape(-1, 4)], 1)
    order = np.lexsort(keys.T[::-1])  # by class, then by the matrix entries
    ordered = keys[order]
    first = np.ones(order.size, dtype=bool)
    first[1:] = np.any(ordered[1:] != ordered[:-1], axis=1)
    starts = np.flatnonzero(first)  # (G,) position of each pair's first row in ``order``
    if starts.size == order.size:
        return values, rotations, class_index
    group = np.cumsum(first) - 1  # (M,) pair of each row of ``order``
    merged = []
    for v in values:
        rows = v.reshape(order.size, -1)
        if xp is np:
            # A sparse (G, M) 0/1 matrix sums the rows of each pair: a few times faster than reduceat here.
            summing = scipy.sparse.csr_matrix(
                (np.ones(order.size, dtype=np.float32), (group, order)), shape=(starts.size, order.size)
            )
            real_rows = np.ascontiguousarray(rows).view(np.float32)  # complex rows as interleaved (re, im)
            out = np.asarray(summing @ real_rows).view(v.dtype)
        else:
            width = rows.shape[1]
            out = xp.zeros((starts.size, width), dtype=v.dtype)
            index = xp.asarray(group)[:, None] * width + xp.arange(width)[None, :]  # (M, W) flat positions
            _scatter_add(out.ravel(), index.ravel(), rows[xp.asarray(order)].ravel())
        merged.append(out.reshape((starts.size,) + v.shape[1:]))
    representative = xp.asarray(order[starts])
    return merged, rotations[representative], class_index[representative]


def _chunks(count: int, per_item: int, chunk_elements: int) -> list[slice]:
    """Slices over ``count`` items so that each chunk holds about ``chunk_elements`` coefficients."""
    step = max(1, chunk_elements // max(per_item, 1))
    return [slice(start, min(start + step, count)) for start in range(0, count, step)]


def _check_rotations(rotations: Any, ndim: int) -> Any:
    """Validate a stack of rotation matrices (M, ndim, ndim); returns float32."""
    xp = array_module(rotations)
    rotations = xp.asarray(rotations)
    if rotations.ndim != 3 or rotations.shape[1:] != (ndim, ndim):
        raise InvalidArgumentError("rotations", f"expected (M, {ndim}, {ndim}), got {rotations.shape}")
    return rotations.astype(np.float32)


def _positions(kx: Any, ky: Any, rotations: Any, pad_factor: int, padded_box: int, ndim: int) -> list[Any]:
    """Index-unit positions in the extended table of in-plane frequencies (S,) at ``rotations``: ndim (M, S)."""
    # Aᵀ (kx, ky[, 0]) = kx · A[0] + ky · A[1], scaled to the padded grid and offset to its centre index.
    scaled = rotations * np.float32(pad_factor)
    centre = np.float32(padded_box // 2)
    return [
        kx[None, :] * scaled[:, 0, axis, None] + ky[None, :] * scaled[:, 1, axis, None] + centre
        for axis in range(ndim)
    ]


def _extend_periodic(padded_ft: Any, ndim: int) -> Any:
    """Append the two first planes of every axis after the last (periodic images) to a (..., P, P[, P]) array."""
    xp = array_module(padded_ft)
    lead = padded_ft.ndim - ndim
    return xp.pad(padded_ft, [(0, 0)] * lead + [(0, 2)] * ndim, mode="wrap")


def _fold_periodic(extended: Any, padded_box: int, ndim: int) -> Any:
    """Adjoint of :func:`_extend_periodic`: add the wrapped planes back onto planes 0 and 1, crop to P."""
    out = extended.copy()
    for axis in range(out.ndim - ndim, out.ndim):
        src = [slice(None)] * out.ndim
        dst = [slice(None)] * out.ndim
        src[axis] = slice(padded_box, padded_box + 2)
        dst[axis] = slice(0, 2)
        out[tuple(dst)] += out[tuple(src)]
    crop = tuple([slice(None)] * (out.ndim - ndim) + [slice(0, padded_box)] * ndim)
    return out[crop]


def hermitian_symmetrize(padded_ft: Any, ndim: int) -> Any:
    """``(A(q) + conj A(-q)) / 2`` over the last ``ndim`` axes of a centred transform with even side P."""
    xp = array_module(padded_ft)
    axes = tuple(range(padded_ft.ndim - ndim, padded_ft.ndim))
    # Index j holds q = j - P/2, its mate -q sits at (P - j) mod P: flip then roll by one.
    mate = xp.roll(xp.flip(padded_ft, axis=axes), (1,) * ndim, axis=axes)
    return (padded_ft + xp.conj(mate)) / 2


def _pad_real(x: Any, padded_box: int, ndim: int) -> Any:
    """Zero-pad real arrays (..., D, D[, D]) to side P keeping the origin pixel at the centre: float32."""
    xp = array_module(x)
    box = x.shape[-1]
    start = padded_box // 2 - box // 2
    out = xp.zeros(x.shape[:-ndim] + (padded_box,) * ndim, dtype=np.float32)
    region = tuple([slice(None)] * (x.ndim - ndim) + [slice(start, start + box)] * ndim)
    out[region] = x
    return out


def _crop_real(x: Any, box: int, ndim: int) -> Any:
    """Adjoint of :func:`_pad_real`: the central D box of (..., P, P[, P])."""
    padded_box = x.shape[-1]
    start = padded_box // 2 - box // 2
    region = tuple([slice(None)] * (x.ndim - ndim) + [slice(start, start + box)] * ndim)
    return x[region]


def _check_pad_factor(pad_factor: int) -> int:
    """Validate the (integer) padding factor."""
    if int(pad_factor) != pad_factor or pad_factor < 1:
        raise InvalidArgumentError("pad_factor", f"must be an integer >= 1, got {pad_factor}")
    return int(pad_factor)


def _padded_box(box_px: int, pad_factor: int) -> int:
    """Side P = pad_factor · D of the padded grid; P must be even (its centre and Friedel mates need it)."""
    padded = box_px * pad_factor
    if padded % 2:
        raise InvalidArgumentError("pad_factor", f"pad_factor · box must be even, got {pad_factor} · {box_px}")
    return padded


class Projector:
    """Fourier-slice projector of one real volume (D, D, D); see the module docstring for conventions."""

    def __init__(self, volume: Any, pad_factor: int = 2) -> None:
        """Pad, gridding-correct and transform ``volume`` (D, D, D) once."""
        xp = array_module(volume)
        volume = xp.asarray(volume)
        if volume.ndim != 3 or len(set(volume.shape)) != 1:
            raise InvalidArgumentError("volume", f"expected a cubic (D, D, D) array, got {volume.shape}")
        if not bool(xp.all(xp.isfinite(volume))):
            raise InvalidArgumentError("volume", "contains NaN or Inf")
        self.box_px = int(volume.shape[0])
        self.pad_factor = _check_pad_factor(pad_factor)
        self.padded_box_px = _padded_box(self.box_px, self.pad_factor)
        self.xp = xp
        corrected = volume.astype(np.float32) / gridding_correction(self.box_px, self.padded_box_px, 3, xp)
        padded_ft = fft3_centered(_pad_real(corrected, self.padded_box_px, 3)).astype(np.complex64)
        self._ext = self.padded_box_px + 2
        self._table = _extend_periodic(padded_ft, 3).reshape(1, -1)  # (1, E³) complex64

    def project(
        self, rotations: Any, coefficients: Any = None, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
    ) -> Any:
        """Centred Fourier slices at RELION matrices (M, 3, 3): (M, D, D) complex64, or (M, C) for a subset."""
        xp = self.xp
        rotations = _check_rotations(xp.asarray(rotations), 3)
        plan = _make_plan(self.box_px, coefficients, xp)
        n_direct = int(plan.kx.size)
        values = xp.empty((rotations.shape[0], n_direct), dtype=np.complex64)  # (M, S)
        for chunk in _chunks(rotations.shape[0], n_direct, chunk_elements):
            pos = _positions(plan.kx, plan.ky, rotations[chunk], self.pad_factor, self.padded_box_px, 3)
            values[chunk] = _gather(self._table, self._ext, pos)[0]
        return _expand(plan, values)


def backproject(
    slices: Any,
    rotations: Any,
    *,
    box_px: int | None = None,
    coefficients: Any = None,
    pad_factor: int = 2,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> Any:
    """Exact adjoint of :meth:`Projector.project`: slices (M, D, D) or (M, C) -> real volume (D, D, D) float32.

    ``box_px`` is required with a coefficient subset (the slices then do not carry D).
    """
    xp = array_module(slices, rotations)
    if coefficients is None:
        box_px = slices.shape[-1]
    elif box_px is None:
        raise InvalidArgumentError("box_px", "required when slices are a coefficient subset")
    accumulator = FourierAccumulator(box_px, pad_factor=pad_factor, xp=xp, with_weights=False)
    accumulator.insert(slices, rotations, coefficients=coefficients, chunk_elements=chunk_elements)
    padded = _fold_periodic(accumulator.data.reshape((accumulator._ext,) * 3), accumulator.padded_box_px, 3)
    # Adjoint of the unnormalised centred FFT is P³ times the centred inverse.
    real = ifft3_centered(padded).real * np.float32(accumulator.padded_box_px**3)
    cropped = _crop_real(real, box_px, 3)
    return (cropped / gridding_correction(box_px, accumulator.padded_box_px, 3, xp)).astype(np.float32)


class FourierAccumulator:
    """Padded 3D Fourier accumulators of inserted slices (complex) and their weights (real)."""

    def __init__(self, box_px: int, pad_factor: int = 2, xp: ModuleType = np, with_weights: bool = True) -> None:
        """Zeroed accumulators for slices of a D×D box on a ``pad_factor``-padded grid."""
        self.box_px = int(box_px)
        self.pad_factor = _check_pad_factor(pad_factor)
        self.padded_box_px = _padded_box(self.box_px, self.pad_factor)
        self.xp = xp
        self._ext = self.padded_box_px + 2
        self.data = xp.zeros(self._ext**3, dtype=np.complex64)  # (E³,) flat, E = P + 2
        self.weight = xp.zeros(self._ext**3, dtype=np.float32) if with_weights else None  # (E³,)

    def insert(
        self,
        slices: Any,
        rotations: Any,
        slice_weights: Any = None,
        *,
        coefficients: Any = None,
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    ) -> None:
        """Add slices (M, D, D)/(M, C) complex and optional weights of the same shape at matrices (M, 3, 3)."""
        xp = self.xp
        rotations = _check_rotations(xp.asarray(rotations), 3)
        slices = xp.asarray(slices)
        if slices.shape[0] != rotations.shape[0]:
            raise InvalidArgumentError("slices", f"{slices.shape[0]} slices for {rotations.shape[0]} rotations")
        if coefficients is None and slices.shape[-2:] != (self.box_px, self.box_px):
            raise InvalidArgumentError("slices", f"expected (M, {self.box_px}, {self.box_px}), got {slices.shape}")
        plan = _make_plan(self.box_px, coefficients, xp)
        use_weights = slice_weights is not None
        if use_weights and self.weight is None:
            raise InvalidArgumentError("slice_weights", "this accumulator keeps no weights")
        if use_weights:
            slice_weights = xp.broadcast_to(xp.asarray(slice_weights, dtype=np.float32), slices.shape)
        n_direct = int(plan.kx.size)
        for chunk in _chunks(rotations.shape[0], n_direct, chunk_elements):
            pos = _positions(plan.kx, plan.ky, rotations[chunk], self.pad_factor, self.padded_box_px, 3)
            accs = [self.data]
            vals = [_fold(plan, slices[chunk].astype(np.complex64, copy=False), conjugate=True)]
            if use_weights:
                accs.append(self.weight)
                vals.append(_fold(plan, slice_weights[chunk], conjugate=False))
            _scatter(accs, vals, self._ext, pos, None)

    def insert_at(
        self,
        frequencies: Any,
        values: Any,
        rotations: Any,
        sample_weights: Any = None,
        *,
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    ) -> None:
        """Add samples (M, S) taken at fractional in-plane frequencies (S, 2) = (kx, ky), in D-box units.

        No Friedel mate is added: a caller inserting one half of a Hermitian set passes each sample with its
        mate folded in (``x(k) + conj(x(-k))``), as :meth:`insert` does.
        """
        xp = self.xp
        rotations = _check_rotations(xp.asarray(rotations), 3)
        frequencies = xp.asarray(frequencies, dtype=np.float32)
        values = xp.asarray(values).astype(np.complex64, copy=False)
        expected = (rotations.shape[0], frequencies.shape[0])
        if frequencies.ndim != 2 or frequencies.shape[1] != 2 or values.shape != expected:
            raise InvalidArgumentError("values", f"expected (M, S) samples at (S, 2) frequencies, got {values.shape}")
        if bool(xp.any(4 * xp.sum(frequencies**2, axis=1) > self.box_px**2)):
            raise InvalidArgumentError("frequencies", "must lie within |k| <= D / 2")
        use_weights = sample_weights is not None
        if use_weights:
            if self.weight is None:
                raise InvalidArgumentError("sample_weights", "this accumulator keeps no weights")
            sample_weights = xp.broadcast_to(xp.asarray(sample_weights, dtype=np.float32), values.shape)
        kx, ky = frequencies[:, 0], frequencies[:, 1]
        for chunk in _chunks(rotations.shape[0], int(kx.size), chunk_elements):
            pos = _positions(kx, ky, rotations[chunk], self.pad_factor, self.padded_box_px, 3)
            accs, vals = [self.data], [values[chunk]]
            if use_weights:
                accs.append(self.weight)
                vals.append(sample_weights[chunk])
            _scatter(accs, vals, self._ext, pos, None)

    def padded_sums(self) -> tuple[Any, Any]:
        """Folded, Hermitian-symmetrised sums on the centred padded grid: data (P,P,P) complex64, weight (P,P,P)."""
        shape = (self._ext,) * 3
        data = hermitian_symmetrize(_fold_periodic(self.data.reshape(shape), self.padded_box_px, 3), 3)
        if self.weight is None:
            return data, None
        weight = hermitian_symmetrize(_fold_periodic(self.weight.reshape(shape), self.padded_box_px, 3), 3).real
        return data.astype(np.complex64), weight.astype(np.float32)

    def add(self, other: FourierAccumulator) -> None:
        """Add another accumulator of the same geometry into this one (e.g. merging half-sets or workers)."""
        if (other.box_px, other.pad_factor) != (self.box_px, self.pad_factor):
            raise InvalidArgumentError("other", "accumulators differ in box or padding")
        self.data += other.data
        if self.weight is not None and other.weight is not None:
            self.weight += other.weight


class Projector2D:
    """In-plane rotation of the transforms of K real images (K, D, D) from a padded, gridding-corrected table."""

    def __init__(self, images: Any, pad_factor: int = 2) -> None:
        """Pad, gridding-correct and transform ``images`` (K, D, D) or (D, D) once."""
        xp = array_module(images)
        images = xp.asarray(images)
        if images.ndim == 2:
            images = images[None]
        if images.ndim != 3 or images.shape[1] != images.shape[2]:
            raise InvalidArgumentError("images", f"expected (K, D, D), got {images.shape}")
        if not bool(xp.all(xp.isfinite(images))):
            raise InvalidArgumentError("images", "contains NaN or Inf")
        self.n_images = int(images.shape[0])
        self.box_px = int(images.shape[-1])
        self.pad_factor = _check_pad_factor(pad_factor)
        self.padded_box_px = _padded_box(self.box_px, self.pad_factor)
        self.xp = xp
        corrected = images.astype(np.float32) / gridding_correction(self.box_px, self.padded_box_px, 2, xp)
        padded_ft = fft2_centered(_pad_real(corrected, self.padded_box_px, 2)).astype(np.complex64)
        self._ext = self.padded_box_px + 2
        self._table = _extend_periodic(padded_ft, 2).reshape(self.n_images, -1)  # (K, E²) complex64

    def rotate(
        self, rotations: Any, coefficients: Any = None, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
    ) -> Any:
        """Transforms sampled at ``Aᵀ k`` for matrices (R, 2, 2): (K, R, D, D) complex64, or (K, R, C).

        When the matrices are four quarter-turned copies of their first quarter (``A_{j + R/4} = A_j·A(90°)``, as on a
        uniform angle grid with R divisible by 4) and the coefficients hold every quarter-turned frequency, only
        the first quarter is interpolated; the others are the same samples, permuted.
        """
        xp = self.xp
        rotations = _check_rotations(xp.asarray(rotations), 2)
        plan = _make_plan(self.box_px, coefficients, xp)
        quarter = _quarter_turn_count(rotations)
        if plan.quarter_turn is not None and quarter:
            first = self.rotate(rotations[:quarter], coefficients, chunk_elements)
            flat_first = first.reshape(first.shape[:2] + (-1,))  # (K, R/4, C)
            out = xp.empty((self.n_images, 4 * quarter, flat_first.shape[-1]), dtype=np.complex64)
            out[:, :quarter] = flat_first
            for turn in range(1, 4):
                previous = out[:, (turn - 1) * quarter : turn * quarter]
                out[:, turn * quarter : (turn + 1) * quarter] = xp.take(previous, plan.quarter_turn, axis=-1)
            return out.reshape((self.n_images, 4 * quarter) + first.shape[2:])
        n_direct = int(plan.kx.size)
        values = xp.empty((self.n_images, rotations.shape[0], n_direct), dtype=np.complex64)  # (K, R, S)
        for chunk in _chunks(rotations.shape[0], n_direct * self.n_images, chunk_elements):
            pos = _positions(plan.kx, plan.ky, rotations[chunk], self.pad_factor, self.padded_box_px, 2)
            values[:, chunk] = _gather(self._table, self._ext, pos)
        return _expand(plan, values)


def _quarter_turn_count(rotations: Any) -> int:
    """R / 4 when in-plane matrices (R, 2, 2) are their first quarter followed by three quarter-turned copies of the
    quarter before (``A_{j + R/4} = A_j·A(90°)``, to float32 rounding), else 0."""
    count = rotations.shape[0]
    if count < 4 or count % 4:
        return 0
    quarter = count // 4
    host = to_host(rotations).astype(np.float64)
    turn = np.array([[0.0, 1.0], [-1.0, 0.0]])  # rotation_matrix_2d(90°)
    return quarter if np.allclose(host[quarter:], host[:-quarter] @ turn, rtol=0.0, atol=1e-6) else 0


def backrotate_2d(
    slices: Any,
    rotations: Any,
    *,
    box_px: int | None = None,
    coefficients: Any = None,
    pad_factor: int = 2,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> Any:
    """Exact adjoint of :meth:`Projector2D.rotate`: slices (K, R, D, D)/(K, R, C) -> real images (K, D, D)."""
    xp = array_module(slices, rotations)
    slices = xp.asarray(slices)
    if coefficients is None:
        box_px = slices.shape[-1]
    elif box_px is None:
        raise InvalidArgumentError("box_px", "required when slices are a coefficient subset")
    n_images, n_rot = slices.shape[0], slices.shape[1]
    accumulator = FourierAccumulator2D(n_images, box_px, pad_factor=pad_factor, xp=xp, with_weights=False)
    rotations = xp.asarray(rotations)
    flat_slices = slices.reshape((n_images * n_rot,) + slices.shape[2:])
    all_rotations = xp.broadcast_to(rotations[None], (n_images,) + rotations.shape).reshape(-1, 2, 2)
    classes = xp.repeat(xp.arange(n_images), n_rot)
    accumulator.insert(flat_slices, all_rotations, classes, coefficients=coefficients, chunk_elements=chunk_elements)
    p = accumulator.padded_box_px
    padded = _fold_periodic(accumulator.data.reshape(n_images, accumulator._ext, accumulator._ext), p, 2)
    real = ifft2_centered(padded).real * np.float32(p * p)
    cropped = _crop_real(real, box_px, 2)
    return (cropped / gridding_correction(box_px, p, 2, xp)).astype(np.float32)


class FourierAccumulator2D:
    """Per-class padded 2D Fourier accumulators (K classes) of inserted rotated images and their weights."""

    def __init__(
        self, n_classes: int, box_px: int, pad_factor: int = 2, xp: ModuleType = np, with_weights: bool = True
    ) -> None:
        """Zeroed accumulators for K classes of D×D images on a ``pad_factor``-padded grid."""
        if n_classes < 1:
            raise InvalidArgumentError("n_classes", f"must be >= 1, got {n_classes}")
        self.n_classes = int(n_classes)
        self.box_px = int(box_px)
        self.pad_factor = _check_pad_factor(pad_factor)
        self.padded_box_px = _padded_box(self.box_px, self.pad_factor)
        self.xp = xp
        self._ext = self.padded_box_px + 2
        self.data = xp.zeros(self.n_classes * self._ext**2, dtype=np.complex64)  # (K·E²,) flat
        self.weight = xp.zeros(self.n_classes * self._ext**2, dtype=np.float32) if with_weights else None

    def insert(
        self,
        slices: Any,
        rotations: Any,
        class_index: Any,
        slice_weights: Any = None,
        *,
        coefficients: Any = None,
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    ) -> None:
        """Add image transforms (N, D, D)/(N, C) at in-plane matrices (N, 2, 2) into classes (N,) int.

        Rows that share a class and a matrix are summed and interpolated once.
        """
        xp = self.xp
        rotations = _check_rotations(xp.asarray(rotations), 2)
        slices = xp.asarray(slices)
        class_index = xp.asarray(class_index).astype(np.int64)
        if slices.shape[0] != rotations.shape[0] or class_index.shape != (slices.shape[0],):
            raise InvalidArgumentError("slices", "slices, rotations and class_index must have the same length")
        if class_index.size and (int(class_index.min()) < 0 or int(class_index.max()) >= self.n_classes):
            raise InvalidArgumentError("class_index", f"must lie in [0, {self.n_classes})")
        plan = _make_plan(self.box_px, coefficients, xp)
        use_weights = slice_weights is not None
        if use_weights and self.weight is None:
            raise InvalidArgumentError("slice_weights", "this accumulator keeps no weights")
        values = [slices.astype(np.complex64, copy=False)]
        if use_weights:
            values.append(xp.broadcast_to(xp.asarray(slice_weights, dtype=np.float32), slices.shape))
        if slices.shape[0] > 1:
            values, rotations, class_index = _merge_equal_poses(values, rotations, class_index)
        n_direct = int(plan.kx.size)
        offsets = class_index * self._ext**2
        accs = [self.data, self.weight] if use_weights else [self.data]
        for chunk in _chunks(rotations.shape[0], n_direct, chunk_elements):
            pos = _positions(plan.kx, plan.ky, rotations[chunk], self.pad_factor, self.padded_box_px, 2)
            vals = [_fold(plan, values[0][chunk], conjugate=True)]
            if use_weights:
                vals.append(_fold(plan, values[1][chunk], conjugate=False))
            _scatter(accs, vals, self._ext, pos, offsets[chunk])

    def insert_at(
        self,
        frequencies: Any,
        values: Any,
        rotations: Any,
        class_index: Any,
        sample_weights: Any = None,
        *,
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    ) -> None:
        """Add samples (N, S) taken at fractional frequencies (S, 2) = (kx, ky) into classes (N,); no mates added."""
        xp = self.xp
        rotations = _check_rotations(xp.asarray(rotations), 2)
        frequencies = xp.asarray(frequencies, dtype=np.float32)
        values = xp.asarray(values).astype(np.complex64, copy=False)
        class_index = xp.asarray(class_index).astype(np.int64)
        expected = (rotations.shape[0], frequencies.shape[0])
        if frequencies.ndim != 2 or frequencies.shape[1] != 2 or values.shape != expected:
            raise InvalidArgumentError("values", f"expected (N, S) samples at (S, 2) frequencies, got {values.shape}")
        if class_index.shape != (values.shape[0],):
            raise InvalidArgumentError("class_index", "expected one class per image")
        if bool(xp.any(4 * xp.sum(frequencies**2, axis=1) > self.box_px**2)):
            raise InvalidArgumentError("frequencies", "must lie within |k| <= D / 2")
        use_weights = sample_weights is not None
        if use_weights:
            if self.weight is None:
                raise InvalidArgumentError("sample_weights", "this accumulator keeps no weights")
            sample_weights = xp.broadcast_to(xp.asarray(sample_weights, dtype=np.float32), values.shape)
        kx, ky = frequencies[:, 0], frequencies[:, 1]
        offsets = class_index * self._ext**2
        for chunk in _chunks(rotations.shape[0], int(kx.size), chunk_elements):
            pos = _positions(kx, ky, rotations[chunk], self.pad_factor, self.padded_box_px, 2)
            accs, vals = [self.data], [values[chunk]]
            if use_weights:
                accs.append(self.weight)
                vals.append(sample_weights[chunk])
            _scatter(accs, vals, self._ext, pos, offsets[chunk])

    def padded_sums(self) -> tuple[Any, Any]:
        """Folded, Hermitian-symmetrised sums per class: data (K, P, P) complex64, weight (K, P, P) float32."""
        shape = (self.n_classes, self._ext, self._ext)
        p = self.padded_box_px
        data = hermitian_symmetrize(_fold_periodic(self.data.reshape(shape), p, 2), 2).astype(np.complex64)
        if self.weight is None:
            return data, None
        weight = hermitian_symmetrize(_fold_periodic(self.weight.reshape(shape), p, 2), 2).real
        return data, weight.astype(np.float32)
