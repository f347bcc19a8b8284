"""The batched scoring kernel: particle images against (class × pose) templates under the Gaussian noise model.

Every stage scores the same way. A particle ``n`` is a vector of ``C`` Fourier coefficients ``X_n`` (those inside
the current resolution limit, in any fixed order), its CTF at those coefficients is ``CTF_n``, a template ``m`` is
``T_m`` (a projection of a class volume at a pose, or a rotated 2D class average) and a shift ``s`` is a phase
ramp ``P_s`` (:func:`shift_phase_ramps`); coefficients and shifts follow :mod:`cryostack.core.fourier`. With the
noise variance ``σ²_c`` per coefficient the log-likelihood is, up to a constant that depends on neither the
template nor the shift,

    LL[n, s, m] = −Σ_c |X_nc · P_sc − CTF_nc · T_mc|² / (2 σ²_c)

Since ``|P_sc| = 1`` this expands into three terms, and the kernel evaluates them as dense real matrix products
(SGEMM on CPU, cuBLAS on GPU) rather than as complex products or loops:

    LL = Re(Σ_c (X P CTF / σ²)_{nsc} · conj(T_mc))   a real GEMM: [Re, Im] interleaved rows (N·S, 2C) @ (2C, M)
         − Σ_c (CTF² / 2σ²)_nc · |T_mc|²           a second GEMM: (N, C) @ (C, M), shared by all shifts
         − Σ_c |X_nc|² / 2σ²_c                      one number per particle

Without shifts the two GEMMs run as one, ``[X CTF / σ², −CTF² / 2σ²] @ [T, |T|²]ᵀ``. Shifts expand the
particle side (``N·S`` rows), never the template side. Work proceeds in blocks of particles × templates sized
by ``max_bytes``, so memory stays bounded whatever ``N`` and ``M``; reductions (best pose, top-k, log-sum-exp)
run per block and merge across blocks, so results do not depend on the block size.

Blocks are laid out ``(n, S, m)``: particle, shift, template. Coefficients from a half-plane (``rfft``) layout
stand for two coefficients of the full plane; fold that multiplicity into ``noise_var`` (halve σ² there).
Pre-whitened data (divided by σ) is scored with ``noise_var=None`` (σ² = 1).

The posterior of a (template, shift) pair uses a temperature ``T`` (cryoSPARC's classification uncertainty
factor) on the log-likelihood and optional log-priors: ``score = LL / T + log_prior[m] + shift_log_prior[s]``.
Inputs may be numpy or CuPy arrays; the kernel runs where the particles live and returns arrays of that module.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from cryostack.core.backend import array_module, fft_workers
from cryostack.core.fourier import coefficient_frequencies, coefficient_indices, phase_ramp_2d
from cryostack.errors import InvalidArgumentError

Array = Any  # a numpy or CuPy array

DEFAULT_MAX_BYTES = 256 * 2**20

# Particle-side rows (particles × shifts) a block keeps when templates must be split, so each GEMM stays large
# enough to run at BLAS speed.
_MIN_BLOCK_ROWS = 256

# Above this fraction of (particle, template) pairs within e^_EXP_FLOOR of a particle's best, the log-sum-exp over
# shifts runs densely over the block; below it, only over those pairs (gathering them costs more per pair).
_SPARSE_FRACTION = 0.25

# Columns per chunk when top-k selection first narrows long rows to their best chunks.
_TOP_K_CHUNK = 32

# exp() of float32 runs tens of times slower when its result is subnormal (x86 microcode assists), and posteriors
# below e^-40 ≈ 4e-18 of a particle's best pair are far below float32 resolution of the sums they enter. So the
# relative log-scores fed to exp() are floored here: any product of two such factors stays a normal float.
_EXP_FLOOR = -40.0


@dataclass(frozen=True)
class PreparedTemplates:
    """Templates laid out for the GEMMs, to reuse across calls: ``[Re, Im interleaved | |T|²]`` rows."""

    rows: Array  # (M, 3C) float32

    @property
    def n_templates(self) -> int:
        """Number of templates M."""
        return int(self.rows.shape[0])

    @property
    def n_coefficients(self) -> int:
        """Number of Fourier coefficients C."""
        return int(self.rows.shape[1] // 3)


@dataclass(frozen=True)
class LogLikelihoodBlock:
    """Log-likelihoods of a block of particles × shifts × templates, as a shift-dependent part and an offset.

    The offset does not depend on the shift, so a reduction over shifts (max, log-sum-exp) can take it off after
    reducing, sparing a pass over the (n, S, m) block.
    """

    particles: slice
    templates: slice
    shift_terms: Array  # (n, S, m) float32
    offset: Array  # (n, m) or (n, 1) float32: log-likelihood = shift_terms − offset[:, None, :]

    @property
    def values(self) -> Array:
        """The log-likelihoods (n, S, m) float32 (a new array)."""
        return self.shift_terms - self.offset[:, None, :]


@dataclass(frozen=True)
class PosteriorBlock:
    """Posteriors of a block of particles × shifts × templates, normalised over all templates and shifts."""

    particles: slice
    templates: slice
    values: Array  # (n, S, m) float32
    log_evidence: Array  # (n,) float32: log Σ_{s,m} exp(score), with LL including its per-particle term


@dataclass(frozen=True)
class ForceMaxResult:
    """The best (template, shift) per particle ("force max") and how decisive it is."""

    template: Array  # (N,) int64
    shift: Array  # (N,) int64
    log_likelihood: Array  # (N,) float32: LL at the best pair
    margin: Array  # (N,) float32: best pair's score minus the best of any other template (inf if M = 1)
    max_probability: Array  # (N,) float32: posterior of the best pair
    log_evidence: Array  # (N,) float32


@dataclass(frozen=True)
class TopKResult:
    """The k most probable (template, shift) pairs per particle, best first, with renormalised weights."""

    template: Array  # (N, k) int64
    shift: Array  # (N, k) int64
    weight: Array  # (N, k) float32: posteriors renormalised over the k kept pairs (rows sum to 1)
    log_likelihood: Array  # (N, k) float32
    captured: Array  # (N,) float32: posterior mass of the kept pairs before renormalising
    log_evidence: Array  # (N,) float32


def shift_phase_ramps(shifts_px: Array, box_px: int, coefficients: Array) -> Array:
    """Phase ramps ``(S, C)`` complex64 that move each particle back onto its template, one per candidate shift.

    ``shifts_px`` ``(S, 2)`` are image shifts ``(sx, sy)`` in pixels in the sense of
    :func:`cryostack.core.geometry.relion_origin_to_shift_px`: the particle is its template translated by
    ``+s``. The ramp translates by ``−s`` (:func:`cryostack.core.fourier.phase_ramp_2d`), at the coefficients
    (a boolean ``(D, D)`` mask or flat indices into the centred ``D × D`` grid) the particle vectors use.
    """
    xp = array_module(shifts_px, coefficients)
    shifts = xp.asarray(shifts_px, dtype=xp.float64)
    if shifts.ndim != 2 or shifts.shape[1] != 2:
        raise InvalidArgumentError("shifts_px", f"expected (S, 2), got {tuple(shifts.shape)}")
    ky, kx = coefficient_frequencies(box_px, coefficient_indices(box_px, coefficients, xp))
    return phase_ramp_2d(-shifts, box_px, ky=ky, kx=kx)  # (S, C) complex64


def prepare_templates(templates: Array) -> PreparedTemplates:
    """Lay templates ``(M, C)`` complex64 out for scoring once, for reuse across particle batches."""
    xp = array_module(templates)
    matrix = _as_matrix(xp, templates, xp.complex64, "templates")  # (M, C)
    n_templates, n_coeffs = matrix.shape
    interleaved = matrix.view(xp.float32)  # (M, 2C): Re, Im, Re, Im, ...
    rows = xp.empty((n_templates, 3 * n_coeffs), dtype=xp.float32)
    rows[:, : 2 * n_coeffs] = interleaved
    squares = interleaved * interleaved
    xp.add(squares[:, 0::2], squares[:, 1::2], out=rows[:, 2 * n_coeffs :])
    return PreparedTemplates(rows=rows)


def scoring_flops(n_particles: int, n_templates: int, n_coefficients: int, n_shifts: int = 1) -> int:
    """Useful floating-point operations of one scoring pass: the cross-term and the CTF²·|T|² GEMMs."""
    cross = 2 * (n_particles * n_shifts) * (2 * n_coefficients) * n_templates
    ctf_power = 2 * n_particles * n_coefficients * n_templates
    return cross + ctf_power


def log_likelihoods(
    particles: Array,
    templates: Array,
    *,
    ctf: Array | None = None,
    noise_var: Array | None = None,
    shift_ramps: Array | None = None,
) -> Array:
    """All log-likelihoods ``(N, S, M)`` float32 at once (for small problems; see :func:`iter_log_likelihoods`)."""
    problem = _Problem(particles, templates, ctf, noise_var, shift_ramps, 1.0, None, None)
    side = problem.particle_side(0, problem.n_particles)
    return problem.log_likelihood(side, 0, problem.n_templates)


def iter_log_likelihoods(
    particles: Array,
    templates: Array,
    *,
    ctf: Array | None = None,
    noise_var: Array | None = None,
    shift_ramps: Array | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Iterator[LogLikelihoodBlock]:
    """Log-likelihood blocks covering all particles × shifts × templates, particle blocks outermost."""
    problem = _Problem(particles, templates, ctf, noise_var, shift_ramps, 1.0, None, None)
    for p_block, t_blocks in problem.plan(max_bytes):
        side = problem.particle_side(p_block.start, p_block.stop)
        for t_block in t_blocks:
            shift_terms, offset = problem.log_likelihood_parts(side, t_block.start, t_block.stop)
            yield LogLikelihoodBlock(particles=p_block, templates=t_block, shift_terms=shift_terms, offset=offset)


def local_log_likelihoods(
    particles: Array,
    templates: Array,
    template_index: Array,
    *,
    ctf: Array | None = None,
    noise_var: Array | None = None,
    shift_ramps: Array | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Array:
    """Log-likelihoods ``(N, S, m)`` float32 of each particle against its own ``m`` templates (a local search).

    ``template_index`` ``(N, m)`` picks particle ``n``'s templates from the shared table ``(M, C)`` complex64;
    entry ``[n, s, j]`` equals :func:`log_likelihoods`'s ``[n, s, template_index[n, j]]``. The work is ``N·m``
    template rows instead of ``N·M``: each particle block gathers its own templates, forms ``X·CTF/σ² · conj(T)``
    and runs one real GEMM against the shift ramps, ``(n·m, 2C) @ (2C, S)``; the ``CTF²·|T|²`` term is a row-wise
    sum. The table is used as given (no prepared copy), so a large shared table costs no extra memory.
    """
    inputs = _Particles(particles, ctf, noise_var, shift_ramps)
    xp, c = inputs.xp, inputs.n_coeffs
    table = _as_matrix(xp, templates, xp.complex64, "templates")  # (M, C)
    if table.shape[1] != c:
        raise InvalidArgumentError("templates", f"have {table.shape[1]} coefficients, particles {c}")
    index = xp.asarray(template_index)
    if index.ndim != 2 or index.shape[0] != inputs.n_particles or index.shape[1] == 0:
        raise InvalidArgumentError(
            "template_index", f"expected ({inputs.n_particles}, m) with m >= 1, got {tuple(index.shape)}"
        )
    if index.dtype.kind not in "iu":
        raise InvalidArgumentError("template_index", f"must be integers, got {index.dtype}")
    if int(index.min()) < 0 or int(index.max()) >= table.shape[0]:
        raise InvalidArgumentError("template_index", f"must lie in [0, {table.shape[0]})")
    if max_bytes < 1:
        raise InvalidArgumentError("max_bytes", f"must be positive, got {max_bytes}")
    ramps = xp.ones((1, c), dtype=xp.complex64) if inputs.ramps is None else inputs.ramps  # (S, C)
    # Re Σ_c q_c·ramp_sc as a real product: (Re q, Im q) interleaved against (Re ramp, −Im ramp) interleaved.
    ramp_matrix = xp.ascontiguousarray(
        xp.stack([ramps.real, -ramps.imag], axis=2).reshape(ramps.shape[0], 2 * c).T
    )  # (2C, S) float32
    n_total, m = index.shape
    n_shifts = ramps.shape[0]
    # Per particle: its gathered templates, their product with it (complex each), |T|² and the scores.
    step = max(1, max_bytes // (4 * m * (5 * c + 2 * n_shifts)))
    out = xp.empty((n_total, n_shifts, m), dtype=xp.float32)
    for p0 in range(0, n_total, step):
        p1 = min(p0 + step, n_total)
        weighted, ctf_power, x_norm = inputs.particle_terms(p0, p1)
        own = xp.take(table, index[p0:p1], axis=0)  # (n, m, C)
        power = xp.einsum("nc,nmc->nm", ctf_power, own.real**2 + own.imag**2)  # (n, m)
        products = xp.conj(own, out=own)
        products *= weighted[:, None, :]  # (n, m, C): X·CTF/σ²·conj(T)
        cross = (products.view(xp.float32).reshape(-1, 2 * c) @ ramp_matrix).reshape(p1 - p0, m, n_shifts)
        cross -= (power + x_norm[:, None])[:, :, None]
        out[p0:p1] = xp.swapaxes(cross, 1, 2)
    return out


def iter_posteriors(
    particles: Array,
    templates: Array,
    *,
    ctf: Array | None = None,
    noise_var: Array | None = None,
    shift_ramps: Array | None = None,
    temperature: float = 1.0,
    log_prior: Array | None = None,
    shift_log_prior: Array | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Iterator[PosteriorBlock]:
    """Posterior blocks (marginalised mode) covering all particles × shifts × templates, particle blocks outermost.

    Each particle's posteriors sum to 1 over all of its blocks. When the templates do not fit one block, each
    particle block is scored twice: once for the normaliser, once to emit the posteriors.
    """
    problem = _Problem(particles, templates, ctf, noise_var, shift_ramps, temperature, log_prior, shift_log_prior)
    xp, temp = problem.xp, problem.temperature
    with _RowWorkers(xp) as workers:
        for p_block, t_blocks in problem.plan(max_bytes):
            side = problem.particle_side(p_block.start, p_block.stop)
            n = side.n_particles
            if len(t_blocks) == 1:
                cross, offset = problem.scaled_scores(side, t_blocks[0].start, t_blocks[0].stop)
                (lse,) = workers.map(_posteriors_one_pass, n, (cross, offset), temp)
                yield PosteriorBlock(p_block, t_blocks[0], values=cross, log_evidence=lse - side.x_norm / temp)
                continue
            lse = None
            for t_block in t_blocks:
                cross, offset = problem.scaled_scores(side, t_block.start, t_block.stop)
                (chunk_lse,) = workers.map(_log_sum_exp_pairs, n, (cross, offset), temp)
                lse = chunk_lse if lse is None else xp.logaddexp(lse, chunk_lse)
            for t_block in t_blocks:
                cross, offset = problem.scaled_scores(side, t_block.start, t_block.stop)
                workers.map(_normalise, n, (cross, offset, lse), temp)
                yield PosteriorBlock(p_block, t_block, values=cross, log_evidence=lse - side.x_norm / temp)


def score_force_max(
    particles: Array,
    templates: Array,
    *,
    ctf: Array | None = None,
    noise_var: Array | None = None,
    shift_ramps: Array | None = None,
    temperature: float = 1.0,
    log_prior: Array | None = None,
    shift_log_prior: Array | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> ForceMaxResult:
    """The highest-scoring (template, shift) per particle, its log-likelihood, margin and posterior."""
    problem = _Problem(particles, templates, ctf, noise_var, shift_ramps, temperature, log_prior, shift_log_prior)
    xp, temp = problem.xp, problem.temperature
    outputs: list[tuple[Array, ...]] = []
    with _RowWorkers(xp) as workers:
        for p_block, t_blocks in problem.plan(max_bytes):
            side = problem.particle_side(p_block.start, p_block.stop)
            best = second = best_template = best_shift = lse = None
            for t_block in t_blocks:
                cross, offset = problem.scaled_scores(side, t_block.start, t_block.stop)
                top, top_score, shift, runner_up, chunk_lse = workers.map(
                    _best_pairs, side.n_particles, (cross, offset), temp
                )
                top = top + t_block.start
                if best is None:
                    best, second, best_template, best_shift, lse = top_score, runner_up, top, shift, chunk_lse
                    continue
                improved = top_score > best
                second = xp.where(improved, xp.maximum(best, runner_up), xp.maximum(second, top_score))
                best = xp.where(improved, top_score, best)
                best_template = xp.where(improved, top, best_template)
                best_shift = xp.where(improved, shift, best_shift)
                lse = xp.logaddexp(lse, chunk_lse)
            ll = best - problem.scaled_prior_at(best_template, best_shift) - side.x_norm
            evidence = lse - side.x_norm / temp
            outputs.append((best_template, best_shift, ll, (best - second) / temp, xp.exp(best / temp - lse), evidence))
    columns = [xp.concatenate(column) for column in zip(*outputs, strict=True)]
    template, shift, ll, margin, max_probability, log_evidence = columns
    return ForceMaxResult(
        template=template.astype(xp.int64),
        shift=shift.astype(xp.int64),
        log_likelihood=ll.astype(xp.float32),
        margin=margin.astype(xp.float32),
        max_probability=max_probability.astype(xp.float32),
        log_evidence=log_evidence.astype(xp.float32),
    )


def score_top_k(
    particles: Array,
    templates: Array,
    k: int,
    *,
    ctf: Array | None = None,
    noise_var: Array | None = None,
    shift_ramps: Array | None = None,
    temperature: float = 1.0,
    log_prior: Array | None = None,
    shift_log_prior: Array | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> TopKResult:
    """The ``k`` most probable (template, shift) pairs per particle (marginalised mode, significant poses only)."""
    problem = _Problem(particles, templates, ctf, noise_var, shift_ramps, temperature, log_prior, shift_log_prior)
    xp, temp = problem.xp, problem.temperature
    k = min(int(k), problem.n_templates * problem.n_shifts)
    if k < 1:
        raise InvalidArgumentError("k", f"must be at least 1, got {k}")
    outputs: list[tuple[Array, ...]] = []
    with _RowWorkers(xp) as workers:
        for p_block, t_blocks in problem.plan(max_bytes):
            side = problem.particle_side(p_block.start, p_block.stop)
            kept_score = kept_template = kept_shift = lse = None
            for t_block in t_blocks:
                cross, offset = problem.scaled_scores(side, t_block.start, t_block.stop)
                score, template, shift, chunk_lse = workers.map(_top_pairs, side.n_particles, (cross, offset), temp, k)
                template = template + t_block.start
                if kept_score is None:
                    kept_score, kept_template, kept_shift, lse = score, template, shift, chunk_lse
                    continue
                kept_score = xp.concatenate([kept_score, score], axis=1)
                kept_template = xp.concatenate([kept_template, template], axis=1)
                kept_shift = xp.concatenate([kept_shift, shift], axis=1)
                keep = _top_indices(xp, kept_score, k)
                kept_score = xp.take_along_axis(kept_score, keep, axis=1)
                kept_template = xp.take_along_axis(kept_template, keep, axis=1)
                kept_shift = xp.take_along_axis(kept_shift, keep, axis=1)
                lse = xp.logaddexp(lse, chunk_lse)
            order = xp.argsort(-kept_score, axis=1)  # (n, k): best first
            kept_score = xp.take_along_axis(kept_score, order, axis=1)
            kept_template = xp.take_along_axis(kept_template, order, axis=1)
            kept_shift = xp.take_along_axis(kept_shift, order, axis=1)
            probability = xp.exp(kept_score / temp - lse[:, None])  # (n, k)
            captured = probability.sum(axis=1)
            ll = kept_score - problem.scaled_prior_at(kept_template, kept_shift) - side.x_norm[:, None]
            evidence = lse - side.x_norm / temp
            outputs.append((kept_template, kept_shift, probability / captured[:, None], ll, captured, evidence))
    columns = [xp.concatenate(column) for column in zip(*outputs, strict=True)]
    template, shift, weight, ll, captured, log_evidence = columns
    return TopKResult(
        template=template.astype(xp.int64),
        shift=shift.astype(xp.int64),
        weight=weight.astype(xp.float32),
        log_likelihood=ll.astype(xp.float32),
        captured=captured.astype(xp.float32),
        log_evidence=log_evidence.astype(xp.float32),
    )


def _best_pairs(cross: Array, offset: Array | None, temperature: float) -> tuple[Array, Array, Array, Array, Array]:
    """Per particle of a block: best template and its score, best shift, runner-up template score, log-sum-exp.

    ``cross`` ``(n, S, m)`` and ``offset`` ``(n, m)`` (or None) are the parts of ``T·score`` (see
    :meth:`_Problem.scaled_scores`); ``cross`` is overwritten.
    """
    xp = array_module(cross)
    rows = xp.arange(cross.shape[0])
    per_template = cross.max(axis=1) if cross.shape[1] > 1 else cross[:, 0, :]  # (n, m)
    template_score = per_template if offset is None else per_template + offset  # (n, m)
    top = xp.argmax(template_score, axis=1)  # (n,)
    top_score = template_score[rows, top]
    shift = xp.argmax(cross[rows, :, top], axis=1)  # (n,)
    # Runner-up template: hide the best for one max() and put it back (no copy of the block).
    template_score[rows, top] = -xp.inf
    runner_up = template_score.max(axis=1)
    template_score[rows, top] = top_score
    return top, top_score, shift, runner_up, _log_sum_exp_pairs(cross, offset, temperature, per_template)


def _top_pairs(cross: Array, offset: Array | None, temperature: float, k: int) -> tuple[Array, Array, Array, Array]:
    """Per particle of a block: the k best pairs' scores, templates and shifts (unordered), and the log-sum-exp.

    ``cross`` ``(n, S, m)`` and ``offset`` as in :func:`_best_pairs`; ``cross`` is overwritten.
    """
    xp = array_module(cross)
    n, n_shifts, m = cross.shape
    per_template = cross.max(axis=1) if n_shifts > 1 else cross[:, 0, :]  # (n, m)
    template_score = per_template if offset is None else per_template + offset
    # The k best pairs come from at most k templates, the k best by their best shift.
    candidates = _top_indices(xp, template_score, min(k, m))  # (n, kk)
    kk = candidates.shape[1]
    pair_scores = xp.take_along_axis(cross, xp.broadcast_to(candidates[:, None, :], (n, n_shifts, kk)), axis=2)
    if offset is not None:
        pair_scores = pair_scores + xp.take_along_axis(xp.broadcast_to(offset, (n, m)), candidates, axis=1)[:, None]
    flat = pair_scores.reshape(n, n_shifts * kk)  # index = s·kk + j
    pick = _top_indices(xp, flat, min(k, flat.shape[1]))
    score = xp.take_along_axis(flat, pick, axis=1)
    template = xp.take_along_axis(candidates, pick % kk, axis=1)
    return score, template, pick // kk, _log_sum_exp_pairs(cross, offset, temperature, per_template)


def _rows(array: Array | None, rows: slice) -> Array | None:
    """Rows of a per-particle array; an array broadcast over particles (leading size 1) is shared as is."""
    if array is None or array.shape[0] == 1:
        return array
    return array[rows]


class _RowWorkers:
    """Runs per-particle reductions over row ranges of a block on several threads (CPU only).

    BLAS already spreads each GEMM over every core, but numpy's element-wise passes (max, exp, selection) run on
    one; they release the GIL, so splitting a block's particles between threads keeps all cores busy there too.
    """

    def __init__(self, xp: ModuleType) -> None:
        self.count = fft_workers() if xp.__name__ == "numpy" else 1
        self.xp = xp
        self.pool = ThreadPoolExecutor(max_workers=self.count) if self.count > 1 else None

    def __enter__(self) -> _RowWorkers:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown()

    def map(self, function: Callable[..., Any], n_rows: int, arrays: tuple[Array | None, ...], *args: Any) -> tuple:
        """``function(*row_slices_of(arrays), *args)`` over row ranges covering ``0 .. n_rows``; its output arrays
        (one, or a tuple) concatenated along rows, as a tuple. Arrays with one row (or None) are passed whole."""

        def run(rows: slice) -> tuple:
            result = function(*(_rows(array, rows) for array in arrays), *args)
            return result if isinstance(result, tuple) else (result,)

        if self.pool is None or n_rows < 2 * self.count:
            return run(slice(0, n_rows))
        bounds = [round(i * n_rows / self.count) for i in range(self.count + 1)]
        parts = list(self.pool.map(run, [slice(a, b) for a, b in itertools.pairwise(bounds)]))
        return tuple(self.xp.concatenate(column) for column in zip(*parts, strict=True))


@dataclass(frozen=True)
class _ParticleSide:
    rows: Array  # (n·S, 2C) float32, or (n, 3C) without shifts: [Re, Im interleaved of X·P·CTF/σ², −CTF²/2σ²]
    ctf_power: Array | None  # (n, C) float32 CTF²/2σ², when shifts keep the second GEMM separate
    x_norm: Array  # (n,) float32 Σ|X|²/2σ²
    n_particles: int


class _Particles:
    """Validated particle-side inputs in one array module: particles, CTF, noise variances and shift ramps."""

    def __init__(
        self, particles: Array, ctf: Array | None, noise_var: Array | None, shift_ramps: Array | None
    ) -> None:
        xp = array_module(particles)
        self.xp: ModuleType = xp
        self.particles = _as_matrix(xp, particles, xp.complex64, "particles")  # (N, C)
        n_particles, n_coeffs = self.particles.shape
        if n_particles == 0 or n_coeffs == 0:
            raise InvalidArgumentError("particles", "particles, templates and coefficients must all be non-empty")
        self.ctf = None if ctf is None else _as_matrix(xp, ctf, xp.float32, "ctf")  # (N, C)
        if self.ctf is not None and self.ctf.shape != self.particles.shape:
            raise InvalidArgumentError("ctf", f"expected {self.particles.shape}, got {self.ctf.shape}")
        if noise_var is None:
            self.inv_var = xp.ones(n_coeffs, dtype=xp.float32)  # (C,)
        else:
            variance = xp.asarray(noise_var, dtype=xp.float32).reshape(-1)
            if variance.shape != (n_coeffs,):
                raise InvalidArgumentError("noise_var", f"expected ({n_coeffs},), got {tuple(variance.shape)}")
            if not bool(xp.all(variance > 0)):
                raise InvalidArgumentError("noise_var", "every variance must be positive")
            self.inv_var = (1.0 / variance).astype(xp.float32)
        self.ramps = None if shift_ramps is None else _as_matrix(xp, shift_ramps, xp.complex64, "shift_ramps")  # (S, C)
        if self.ramps is not None and self.ramps.shape[1] != n_coeffs:
            raise InvalidArgumentError("shift_ramps", f"have {self.ramps.shape[1]} coefficients, particles {n_coeffs}")
        self.n_particles, self.n_coeffs = n_particles, n_coeffs
        self.n_shifts = 1 if self.ramps is None else self.ramps.shape[0]

    def particle_terms(self, p0: int, p1: int) -> tuple[Array, Array, Array]:
        """Particles ``p0:p1`` as ``X·CTF/σ²`` (n, C) complex64, ``CTF²/2σ²`` (n, C) and ``Σ|X|²/2σ²`` (n,)."""
        xp = self.xp
        x = self.particles[p0:p1]  # (n, C)
        weight = self.inv_var[None, :] if self.ctf is None else self.ctf[p0:p1] * self.inv_var  # (n, C) or (1, C)
        ctf_power = 0.5 * self.inv_var[None, :] if self.ctf is None else 0.5 * self.ctf[p0:p1] ** 2 * self.inv_var
        x_norm = (x.real**2 + x.imag**2) @ (0.5 * self.inv_var)  # (n,)
        return x * weight, xp.broadcast_to(ctf_power, x.shape), x_norm


class _Problem(_Particles):
    """Validated inputs in one array module, with the template side precomputed once."""

    def __init__(
        self,
        particles: Array,
        templates: Array,
        ctf: Array | None,
        noise_var: Array | None,
        shift_ramps: Array | None,
        temperature: float,
        log_prior: Array | None,
        shift_log_prior: Array | None,
    ) -> None:
        super().__init__(particles, ctf, noise_var, shift_ramps)
        xp = self.xp
        prepared = templates if isinstance(templates, PreparedTemplates) else prepare_templates(xp.asarray(templates))
        # [Re T, Im T interleaved | |T|²]: one matrix serves both GEMMs (and the fused one without shifts).
        self.template_rows = xp.asarray(prepared.rows)  # (M, 3C) float32
        if prepared.n_coefficients != self.n_coeffs:
            raise InvalidArgumentError(
                "templates", f"have {prepared.n_coefficients} coefficients, particles {self.n_coeffs}"
            )
        if prepared.n_templates == 0:
            raise InvalidArgumentError("particles", "particles, templates and coefficients must all be non-empty")
        if not (math.isfinite(temperature) and temperature > 0):
            raise InvalidArgumentError("temperature", f"must be positive, got {temperature}")
        self.temperature = float(temperature)
        self.n_templates = prepared.n_templates
        self.log_prior = _as_vector(xp, log_prior, self.n_templates, "log_prior")  # (M,) or None
        self.shift_log_prior = _as_vector(xp, shift_log_prior, self.n_shifts, "shift_log_prior")  # (S,) or None

    def plan(self, max_bytes: int) -> Iterator[tuple[slice, list[slice]]]:
        """Particle blocks, each with the template blocks that cover all templates, within ``max_bytes``."""
        if max_bytes < 1:
            raise InvalidArgumentError("max_bytes", f"must be positive, got {max_bytes}")
        n_chunk, m_chunk = _block_sizes(self.n_particles, self.n_templates, self.n_shifts, self.n_coeffs, max_bytes)
        t_blocks = [slice(t0, min(t0 + m_chunk, self.n_templates)) for t0 in range(0, self.n_templates, m_chunk)]
        for p0 in range(0, self.n_particles, n_chunk):
            yield slice(p0, min(p0 + n_chunk, self.n_particles)), t_blocks

    def particle_side(self, p0: int, p1: int) -> _ParticleSide:
        """The particle-side GEMM operands of particles ``p0:p1``."""
        xp = self.xp
        weighted, ctf_power, x_norm = self.particle_terms(p0, p1)
        n, c = weighted.shape
        if self.ramps is None:
            rows = xp.empty((n, 3 * c), dtype=xp.float32)
            rows[:, : 2 * c] = weighted.view(xp.float32)
            rows[:, 2 * c :] = -ctf_power
            return _ParticleSide(rows=rows, ctf_power=None, x_norm=x_norm.astype(xp.float32), n_particles=n)
        shifted = weighted[:, None, :] * self.ramps[None, :, :]  # (n, S, C) complex64
        rows = shifted.view(xp.float32).reshape(n * self.n_shifts, 2 * c)
        return _ParticleSide(
            rows=rows, ctf_power=xp.ascontiguousarray(ctf_power), x_norm=x_norm.astype(xp.float32), n_particles=n
        )

    def cross_and_power(self, side: _ParticleSide, t0: int, t1: int) -> tuple[Array, Array | None]:
        """The GEMMs for templates ``t0:t1``: ``(n, S, m)`` cross term (fused with −power when unshifted)."""
        c = self.n_coeffs
        if side.ctf_power is None:
            cross = side.rows @ self.template_rows[t0:t1].T  # (n, m): cross term − power term in one GEMM
            return cross.reshape(side.n_particles, 1, t1 - t0), None
        cross = side.rows @ self.template_rows[t0:t1, : 2 * c].T  # (n·S, m)
        power = side.ctf_power @ self.template_rows[t0:t1, 2 * c :].T  # (n, m)
        return cross.reshape(side.n_particles, self.n_shifts, t1 - t0), power

    def log_likelihood_parts(self, side: _ParticleSide, t0: int, t1: int) -> tuple[Array, Array]:
        """Log-likelihoods against templates ``t0:t1`` as ``(n, S, m)`` shift terms minus an ``(n, m)`` or
        ``(n, 1)`` offset."""
        cross, power = self.cross_and_power(side, t0, t1)
        offset = side.x_norm[:, None] if power is None else power + side.x_norm[:, None]
        return cross, offset

    def log_likelihood(self, side: _ParticleSide, t0: int, t1: int) -> Array:
        """Log-likelihoods ``(n, S, m)`` float32 of the particle block against templates ``t0:t1``."""
        cross, offset = self.log_likelihood_parts(side, t0, t1)
        cross -= offset[:, None, :]
        return cross

    def scaled_scores(self, side: _ParticleSide, t0: int, t1: int) -> tuple[Array, Array | None]:
        """``T × score + Σ|X|²/2σ²`` split as ``(n, S, m)`` shift-dependent part plus ``(n, m)`` offset (or None).

        The per-particle term is left out (it cancels in every posterior and argmax); the prior terms are
        multiplied by the temperature so the two parts add up to ``T·score`` directly.
        """
        cross, power = self.cross_and_power(side, t0, t1)
        if self.shift_log_prior is not None:
            cross += (self.temperature * self.shift_log_prior)[None, :, None]
        offset = None if power is None else -power  # (n, m)
        if self.log_prior is not None:
            prior = (self.temperature * self.log_prior[t0:t1])[None, :]
            offset = prior if offset is None else offset + prior
        return cross, offset

    def scaled_prior_at(self, template: Array, shift: Array) -> Array:
        """``T × (log_prior[template] + shift_log_prior[shift])`` for index arrays of one shape (0 without priors)."""
        total = self.xp.zeros(template.shape, dtype=self.xp.float32)
        if self.log_prior is not None:
            total = total + self.log_prior[template]
        if self.shift_log_prior is not None:
            total = total + self.shift_log_prior[shift]
        return self.temperature * total


def _log_sum_exp_pairs(
    cross: Array, offset: Array | None, temperature: float, per_template: Array | None = None
) -> Array:
    """``log Σ_{s,m} exp((cross + offset) / T)`` per particle; overwrites ``cross`` (``per_template``: its max over
    shifts, when already known)."""
    xp = array_module(cross)
    if cross.shape[1] == 1:
        template_lse = cross[:, 0, :]  # (n, m), a view: scaled in place
        if temperature != 1.0:
            template_lse *= 1.0 / temperature
        if offset is not None:
            template_lse += offset if temperature == 1.0 else offset * (1.0 / temperature)
        return _row_log_sum_exp(xp, template_lse, overwrite=True)
    if per_template is None:
        per_template = cross.max(axis=1)  # (n, m)
    peak = per_template if offset is None else per_template + offset
    peak = peak if temperature == 1.0 else peak * (1.0 / temperature)  # (n, m): each template's best scaled score
    row_peak = peak.max(axis=1)  # (n,)
    relevant = peak > (row_peak + _EXP_FLOOR)[:, None]  # (n, m): templates that can carry any posterior mass
    if float(relevant.mean()) <= _SPARSE_FRACTION:
        # Posteriors are usually concentrated on few templates: exponentiate only their shifts.
        rows, columns = xp.nonzero(relevant)
        values = cross[rows, :, columns]  # (K, S)
        values -= per_template[rows, columns][:, None]
        if temperature != 1.0:
            values *= 1.0 / temperature
        weights = _floored_exp(xp, values, out=values).sum(axis=1) * _floored_exp(
            xp, peak[rows, columns] - row_peak[rows]
        )
        return xp.log(xp.bincount(rows, weights=weights, minlength=cross.shape[0])) + row_peak
    cross -= per_template[:, None, :]
    if temperature != 1.0:
        cross *= 1.0 / temperature
    _floored_exp(xp, cross, out=cross)
    template_lse = xp.log(cross.sum(axis=1)) + peak  # (n, m)
    return _row_log_sum_exp(xp, template_lse, overwrite=True)


def _posteriors_one_pass(cross: Array, offset: Array | None, temperature: float) -> Array:
    """Posteriors in place in ``cross`` ``(n, S, m)`` and their log normaliser ``(n,)``, when one block holds every
    template."""
    xp = array_module(cross)
    if cross.shape[1] == 1:
        template_lse = cross[:, 0, :] if offset is None else cross[:, 0, :] + offset
        template_lse = template_lse / temperature  # (n, m)
        lse = _row_log_sum_exp(xp, template_lse)
        cross[:, 0, :] = _floored_exp(xp, template_lse - lse[:, None])
        return lse
    per_template = cross.max(axis=1)  # (n, m)
    cross -= per_template[:, None, :]
    if temperature != 1.0:
        cross *= 1.0 / temperature
    _floored_exp(xp, cross, out=cross)
    peak_term = per_template / temperature if offset is None else (per_template + offset) / temperature  # (n, m)
    lse = _row_log_sum_exp(xp, xp.log(cross.sum(axis=1)) + peak_term)
    cross *= _floored_exp(xp, peak_term - lse[:, None])[:, None, :]
    return lse


def _row_log_sum_exp(xp: ModuleType, values: Array, overwrite: bool = False) -> Array:
    """``log Σ_j exp(values[:, j])`` ``(n,)``, stable; ``overwrite`` lets it reuse ``values`` as scratch."""
    peak = values.max(axis=1)
    scratch = values if overwrite else xp.empty_like(values)
    xp.subtract(values, peak[:, None], out=scratch)
    return xp.log(_floored_exp(xp, scratch, out=scratch).sum(axis=1)) + peak


def _floored_exp(xp: ModuleType, values: Array, out: Array | None = None) -> Array:
    """``exp(max(values, _EXP_FLOOR))``: values are log-ratios ≤ 0, floored to keep results normal floats."""
    floored = xp.maximum(values, _EXP_FLOOR, out=out)
    return xp.exp(floored, out=floored)


def _normalise(cross: Array, offset: Array | None, lse: Array, temperature: float) -> Array:
    """Posteriors ``exp((cross + offset)/T − lse)`` in place in ``cross``."""
    xp = array_module(cross)
    if offset is not None:
        cross += offset[:, None, :]
    if temperature != 1.0:
        cross *= 1.0 / temperature
    cross -= lse[:, None, None]
    return _floored_exp(xp, cross, out=cross)


def _top_indices(xp: ModuleType, values: Array, k: int) -> Array:
    """Column indices ``(n, k)`` of the k largest values per row, in no particular order.

    For long rows, the k largest values lie in the k chunks (of ``_TOP_K_CHUNK`` columns) with the largest maxima,
    so one cheap max-reduction narrows the selection (argpartition) to k chunks per row. Chunk ``c`` holds the
    columns ``c, c + C, c + 2C, ...`` (C chunks), so the reduction runs over whole rows at a time; the columns
    past ``C × _TOP_K_CHUNK`` form one more, shorter chunk.
    """
    n, m = values.shape
    if k >= m:
        return xp.broadcast_to(xp.arange(m), (n, m)).copy()
    width = _TOP_K_CHUNK
    if m <= 4 * k * width:
        return xp.argpartition(values, m - k, axis=1)[:, m - k :]
    n_full = m // width
    chunk_max = values[:, : n_full * width].reshape(n, width, n_full).max(axis=1)  # (n, chunks)
    tail = m - n_full * width
    if tail:
        chunk_max = xp.concatenate([chunk_max, values[:, n_full * width :].max(axis=1, keepdims=True)], axis=1)
    n_chunks = chunk_max.shape[1]
    chunks = xp.argpartition(chunk_max, n_chunks - k, axis=1)[:, n_chunks - k :]  # (n, k)
    offsets = xp.arange(width)
    columns = xp.where(
        chunks[:, :, None] < n_full,
        chunks[:, :, None] + n_full * offsets,
        n_full * width + offsets,
    ).reshape(n, k * width)  # (n, k·width)
    inside = columns < m  # the tail chunk is short
    columns = xp.minimum(columns, m - 1)
    candidates = xp.where(inside, xp.take_along_axis(values, columns, axis=1), -xp.inf)
    pick = xp.argpartition(candidates, k * width - k, axis=1)[:, k * width - k :]
    return xp.take_along_axis(columns, pick, axis=1)


def _block_sizes(n_particles: int, n_templates: int, n_shifts: int, n_coeffs: int, max_bytes: int) -> tuple[int, int]:
    """Particles and templates per block so the block's float32 working set stays within ``max_bytes``."""

    # Per particle × shift row: the score row (m floats) plus the particle-side operands and their complex
    # temporary (about 5C floats).
    def row_bytes(m: int) -> int:
        return 4 * (m + 5 * n_coeffs)

    min_particles = min(n_particles, max(1, -(-_MIN_BLOCK_ROWS // n_shifts)))
    per_particle_all_templates = n_shifts * row_bytes(n_templates)
    if per_particle_all_templates * min_particles <= max_bytes:
        return min(n_particles, max(min_particles, max_bytes // per_particle_all_templates)), n_templates
    templates = max_bytes // (4 * n_shifts * min_particles) - 5 * n_coeffs
    if templates >= min(n_templates, _MIN_BLOCK_ROWS):
        return min_particles, int(min(n_templates, templates))
    # A budget too small for the preferred block shape shrinks the particle side first, the template side last.
    templates = min(n_templates, _MIN_BLOCK_ROWS)
    particles = max_bytes // (n_shifts * row_bytes(templates))
    if particles >= 1:
        return int(min(min_particles, particles)), templates
    return 1, int(min(n_templates, max(1, max_bytes // (4 * n_shifts) - 5 * n_coeffs)))


def _as_matrix(xp: ModuleType, array: Array, dtype: Any, field: str) -> Array:
    matrix = xp.asarray(array)
    if matrix.ndim != 2:
        raise InvalidArgumentError(field, f"expected a 2-D array, got shape {tuple(matrix.shape)}")
    return xp.ascontiguousarray(matrix.astype(dtype, copy=False))


def _as_vector(xp: ModuleType, array: Array | None, length: int, field: str) -> Array | None:
    if array is None:
        return None
    vector = xp.asarray(array, dtype=xp.float32).reshape(-1)
    if vector.shape != (length,):
        raise InvalidArgumentError(field, f"expected ({length},), got {tuple(vector.shape)}")
    return vector
