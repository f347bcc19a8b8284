"""Assignment of particles to classes under per-class capacities: the cap inside an E-step (2D classification's).

Two operations keep class occupancy within a capacity:

* :func:`capped_responsibilities` — soft assignment. The responsibilities ``R = diag(u) P diag(v)`` with
  ``P = exp(log_weights)`` are scaled (Sinkhorn–Knopp) so that every row sums to one and every column sums to at
  most its capacity. This is the entropic optimal-transport problem with upper-bounded column marginals; the
  column scaling ``v_k = min(1, capacity_k / (Pᵀu)_k)`` is exact coordinate ascent on its dual, so a class below
  its capacity is left untouched and an uncapped run reduces to the ordinary posterior.
* :func:`capped_assignment` — hard assignment. The exact maximum-score assignment of N particles to K classes
  with at most ``capacity_k`` particles in class k (a transportation problem), solved by successive shortest
  paths over the K class nodes with class prices as duals, warm-started by Jacobi price raising.

A whole pass keeps each particle's few best classes (:class:`ClassScores`, row-compressed) rather than an (N, K)
table: :func:`capped_assignment_with_rescoring` is still exact over all K classes (it scores again, against every
class, the few particles a relaxation would send beyond their list), and :func:`class_responsibilities` gives
the posterior, capped or not, of the listed classes (the capped one by a quasi-Newton solve of the same scaling's
dual, which needs far fewer passes over a million rows than Sinkhorn–Knopp).

All accept any capacities whose sum is at least the number of particles.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import minimize
from scipy.sparse.csgraph import csgraph_from_dense, dijkstra

from cryostack.core.backend import array_module, to_host
from cryostack.core.numerics import log_sum_exp


# For each particle a round finds taking the extra class, this many of those closest to taking it are scored again
# with it: fewer rounds (each a solve and a read) for a few more particles scored.
_RESCORE_AHEAD = 2
# The exact phase keeps, per pair of classes, this many of the cheapest particles to move between them.
_EDGE_CANDIDATES = 64
# Rows a sweep over a whole table (price raising, the capped posterior) works on together: its working memory is
# ~0.8 KB per row of this block, not per particle.
_BLOCK_ROWS = 1 << 16


def batch_capacity(capacity: np.ndarray, batch_size: int, n_particles: int) -> np.ndarray:
    """Each class's share of its capacity for a minibatch of ``batch_size`` out of ``n_particles`` particles."""
    capacity = np.asarray(capacity, dtype=np.float64)  # (K,)
    return capacity * (batch_size / n_particles)


def _check_capacity(n_rows: int, capacity: np.ndarray, n_classes: int) -> None:
    if capacity.shape != (n_classes,):
        raise ValueError(f"capacity has shape {capacity.shape}, expected ({n_classes},)")
    if np.any(capacity < 0) or np.any(np.isnan(capacity)):
        raise ValueError("capacity must be non-negative")
    if capacity.sum() < n_rows * (1.0 - 1e-12):
        raise ValueError(f"capacities sum to {capacity.sum():g}, fewer than the {n_rows} particles to place")


def capped_responsibilities(
    log_weights: Any, capacity: np.ndarray, *, max_iterations: int = 1000, tolerance: float = 1e-4
) -> Any:
    """Responsibilities with rows summing to one and column sums at most ``capacity`` (Sinkhorn–Knopp)."""
    xp = array_module(log_weights)
    n_rows, n_classes = log_weights.shape  # log_weights: (N, K) tempered log-likelihoods + log priors
    capacity_host = np.asarray(capacity, dtype=np.float64)  # (K,)
    _check_capacity(n_rows, capacity_host, n_classes)
    cap = xp.asarray(np.minimum(capacity_host, float(n_rows)))  # (K,) float64; a cap above N never binds

    log_weights = xp.asarray(log_weights, dtype=xp.float64)
    # Each row's largest entry becomes 1: rows keep full precision where their mass is.
    kernel = xp.exp(log_weights - log_weights.max(axis=1, keepdims=True))  # (N, K) float64
    column_scale = xp.ones(n_classes, dtype=xp.float64)  # (K,) v, at most 1
    for _ in range(max_iterations):
        row_scale = 1.0 / xp.maximum(kernel @ column_scale, 1e-300)  # (N,) u: rows sum to one
        demand = kernel.T @ row_scale  # (K,) column sums before column scaling
        new_scale = xp.minimum(1.0, cap / xp.maximum(demand, 1e-300))
        larger = xp.maximum(xp.maximum(new_scale, column_scale), 1e-300)
        change = float(xp.max(xp.abs(new_scale - column_scale) / larger))
        column_scale = new_scale
        if change < tolerance:
            break
    responsibilities = kernel * column_scale[None, :]
    responsibilities /= responsibilities.sum(axis=1, keepdims=True)
    return _repair_overflow(responsibilities, cap)


def _repair_overflow(responsibilities: Any, cap: Any) -> Any:
    """Move the residual overflow of capped columns (left by finite Sinkhorn iterations) to columns with room.

    Every overflowing column is scaled down to its capacity; each row's removed mass goes to the columns with
    room in proportion to their room. Since the capacities sum to at least N, the total room is at least the
    total overflow, so no column ends above its capacity and rows still sum to one.
    """
    xp = array_module(responsibilities)
    occupancy = responsibilities.sum(axis=0)  # (K,)
    overflow = occupancy > cap
    if not bool(overflow.any()):
        return responsibilities
    shrink = xp.where(overflow, cap / xp.maximum(occupancy, 1e-300), 1.0)  # (K,)
    removed = (responsibilities * (1.0 - shrink)[None, :]).sum(axis=1)  # (N,) mass each row must re-place
    responsibilities = responsibilities * shrink[None, :]
    room = xp.where(overflow, 0.0, xp.maximum(cap - occupancy, 0.0))  # (K,)
    total_room = float(room.sum())
    if total_room > 0:
        # Scale the spread so that no column receives more than its room, whatever rounding did to the sums.
        spread = room / max(total_room, float(removed.sum()))
        responsibilities += removed[:, None] * spread[None, :]
    return responsibilities / responsibilities.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class ClassScores:
    """Each particle's scores for some or all of the K classes, row-compressed.

    Row i lists ``classes[row_start[i]:row_start[i + 1]]`` with their ``scores``; a row that lists every class lists
    them in order 0..K−1. The classes a row leaves out score at most ``excluded_bound[i]`` and their exp-scores sum
    to ``exp(excluded_log_mass[i])`` (both −inf where the row lists every class). A full pass keeps each particle's
    few best classes this way, so its tables grow with N, not N·K.
    """

    row_start: np.ndarray  # (N + 1,) int64
    classes: np.ndarray  # (E,) int32 class of each entry
    scores: np.ndarray  # (E,) float64
    excluded_bound: np.ndarray  # (N,) float64
    excluded_log_mass: np.ndarray  # (N,) float64
    n_classes: int

    @property
    def n_rows(self) -> int:
        return int(self.row_start.size - 1)

    @property
    def entry_row(self) -> np.ndarray:
        """(E,) int64 the row of each entry."""
        return np.repeat(np.arange(self.n_rows, dtype=np.int64), np.diff(self.row_start))

    @classmethod
    def dense(cls, scores: Any) -> ClassScores:
        """Every row lists every class: ``scores`` (N, K)."""
        scores = to_host(scores).astype(np.float64, copy=False)
        n_rows, n_classes = scores.shape
        no_rest = np.full(n_rows, -np.inf)
        return cls(
            np.arange(n_rows + 1, dtype=np.int64) * n_classes, np.tile(np.arange(n_classes, dtype=np.int32), n_rows),
            scores.ravel(), no_rest, no_rest.copy(), n_classes,
        )

    @classmethod
    def from_columns(
        cls, classes: np.ndarray, scores: np.ndarray, excluded_bound: np.ndarray, excluded_log_mass: np.ndarray,
        n_classes: int,
    ) -> ClassScores:
        """Rows of equal length: ``classes`` and ``scores`` (N, M), the rest's bound and log mass (N,)."""
        n_rows, width = classes.shape
        return cls(
            np.arange(n_rows + 1, dtype=np.int64) * width, classes.astype(np.int32, copy=False).ravel(),
            scores.astype(np.float64, copy=False).ravel(), np.asarray(excluded_bound, dtype=np.float64),
            np.asarray(excluded_log_mass, dtype=np.float64), n_classes,
        )

    def with_full_rows(self, rows: np.ndarray, full_scores: np.ndarray) -> ClassScores:
        """These scores with rows ``rows`` (V,) listing every class, from ``full_scores`` (V, K)."""
        lengths = np.diff(self.row_start)
        lengths[rows] = self.n_classes
        row_start, classes, scores = _widened(self, lengths)
        full_positions = row_start[rows][:, None] + np.arange(self.n_classes)  # (V, K)
        classes[full_positions] = np.arange(self.n_classes)
        scores[full_positions] = full_scores
        excluded_bound = self.excluded_bound.copy()
        excluded_log_mass = self.excluded_log_mass.copy()
        excluded_bound[rows] = -np.inf
        excluded_log_mass[rows] = -np.inf
        return ClassScores(row_start, classes, scores, excluded_bound, excluded_log_mass, self.n_classes)


def top_class_columns(scores: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each row's ``count`` best classes of ``scores`` (B, K): their indices (B, count), best first, and the bound
    and log-sum-exp (B,) of the classes left out (−inf when none is)."""
    n_rows, n_classes = scores.shape
    count = min(count, n_classes)
    top = np.argpartition(-scores, count - 1, axis=1)[:, :count] if count < n_classes else np.tile(
        np.arange(n_classes), (n_rows, 1)
    )
    # Best first; equal scores in class order, as argmax breaks ties.
    top = np.take_along_axis(top, np.lexsort((top, -np.take_along_axis(scores, top, axis=1)), axis=1), axis=1)
    if count == n_classes:
        no_rest = np.full(n_rows, -np.inf)
        return top, no_rest, no_rest.copy()
    rest = scores.copy()
    np.put_along_axis(rest, top, -np.inf, axis=1)
    return top, rest.max(axis=1), log_sum_exp(rest, axis=1)


def capped_assignment(scores: Any, capacity: np.ndarray, *, max_warm_sweeps: int = 200) -> np.ndarray:
    """Exact maximum-total-score class of each particle with at most ``capacity[k]`` particles in class k.

    ``scores`` is (N, K) or :class:`ClassScores` (a particle then goes only to a class its row lists; raises if the
    listed classes cannot hold every particle).
    """
    table = scores if isinstance(scores, ClassScores) else ClassScores.dense(scores)
    entries, _ = _assigned_entries(table, capacity, max_warm_sweeps)
    return table.classes[entries]


def capped_assignment_with_rescoring(
    scores: ClassScores,
    capacity: np.ndarray,
    score_rows: Callable[[np.ndarray], np.ndarray],
    *,
    max_warm_sweeps: int = 200,
) -> tuple[np.ndarray, ClassScores, np.ndarray]:
    """The exact capped assignment over all K classes when each row lists only its best classes.

    Solves a relaxation in which every row may also take one extra, unbounded class scoring its
    ``excluded_bound`` (at least as good as any class it leaves out): when no particle takes it, the relaxed
    optimum is attained by a true assignment and is therefore the exact one. Particles that do take it are
    scored again against every class (``score_rows(rows)`` → (V, K)), together with the particles closest to
    taking it (which the next round would otherwise send there), and the problem is solved again; each
    round lists more rows in full, so it ends. Returns each particle's entry in the final scores (N,), those
    scores, and the class prices (K,) proving the assignment optimal (the duals of the capacities).
    """
    capacity = np.asarray(capacity)
    relaxed_capacity = np.append(capacity, scores.n_rows)  # the extra class never fills, so its price stays 0
    relaxed = _with_excluded_class(scores)
    entries, prices = _assigned_entries(relaxed, relaxed_capacity, max_warm_sweeps)
    while True:
        taken = relaxed.classes[entries]
        outside = np.flatnonzero(taken == scores.n_classes)
        if outside.size == 0:
            # Every row keeps its own entries first and in order, so the relaxed entry maps back by its offset.
            rows = relaxed.entry_row[entries]
            return scores.row_start[rows] + (entries - relaxed.row_start[rows]), scores, prices[:-1]
        # Slack: how much better than the extra class each other partial row's class is under the prices.
        slack = relaxed.scores[entries] - prices[taken] - scores.excluded_bound
        slack[outside] = np.inf
        slack[~np.isfinite(scores.excluded_bound)] = np.inf
        ahead = min(_RESCORE_AHEAD * outside.size, slack.size - 1)
        nearest = np.argpartition(slack, ahead)[:ahead]
        rescored = np.union1d(outside, nearest[np.isfinite(slack[nearest])])
        # Warm start from the last optimum: the other rows keep their entries (at the same offsets) and prices;
        # the rescored rows go to their best class under those prices, so every particle still sits at a best
        # class and only the classes they join can be over their capacity.
        offsets = entries - relaxed.row_start[:-1]
        del relaxed  # not held while the table is widened
        scores = scores.with_full_rows(rescored, to_host(score_rows(rescored)).astype(np.float64, copy=False))
        relaxed = _with_excluded_class(scores)
        entries = relaxed.row_start[:-1] + offsets
        run_entries, segments, run_start = _row_entries(relaxed.row_start, rescored)
        values = relaxed.scores[run_entries] - prices[relaxed.classes[run_entries]]
        entries[rescored] = run_entries[_run_argmax(values, run_start, segments)]
        entries, prices = _assigned_entries(relaxed, relaxed_capacity, max_warm_sweeps, (entries, prices))


def class_responsibilities(
    scores: ClassScores,
    capacity: np.ndarray | None,
    *,
    start_log_scale: np.ndarray | None = None,
    max_iterations: int = 1000,
    tolerance: float = 1e-3,
) -> np.ndarray:
    """Each entry's responsibility (E,): the posterior over all K classes, or the capped one.

    The row-compressed counterpart of :func:`capped_responsibilities` for a whole pass, solving the same scaling
    on its dual: the responsibilities are ``exp(score + β_k) / Z_i`` with column log-scales ``β ≤ 0`` (K,)
    minimising the convex ``F(β) = Σ_i log Z_i(β) − Σ_k capacity_k β_k``, whose gradient is each class's expected
    occupancy minus its capacity; at the minimum no class is above its capacity and a class scaled down is exactly
    at it, the point Sinkhorn–Knopp converges to. L-BFGS-B reaches it in tens of passes over the table where
    Sinkhorn–Knopp takes hundreds when a cap binds on many classes. ``tolerance``: the largest such gradient
    component, in particles. ``start_log_scale`` (K,) is where β starts, e.g. ``−prices`` of a capped hard
    assignment of the same scores (its zero-temperature limit).

    The classes a row leaves out keep their mass ``exp(excluded_log_mass)`` unscaled (they are far below the row's
    best, and a class's scale is at most 1), so the capped figure is exact when rows list every class.
    """
    n_rows, n_classes = scores.n_rows, scores.n_classes
    lengths = np.diff(scores.row_start)  # (N,)
    blocks = [(slice(first, min(first + _BLOCK_ROWS, n_rows)),
               slice(scores.row_start[first], scores.row_start[min(first + _BLOCK_ROWS, n_rows)]))
              for first in range(0, n_rows, _BLOCK_ROWS)]  # (rows, their entries)

    def posterior(log_scale: np.ndarray, rows: slice, entries: slice) -> tuple[np.ndarray, np.ndarray]:
        """Responsibilities of a block's entries and its rows' log-normalisers under column log-scales (K,)."""
        shifted = scores.scores[entries] + log_scale[scores.classes[entries]]
        starts = scores.row_start[rows] - entries.start
        rest = scores.excluded_log_mass[rows]
        row_max = np.maximum(np.maximum.reduceat(shifted, starts), rest)
        kernel = np.exp(shifted - np.repeat(row_max, lengths[rows]))
        row_sum = np.add.reduceat(kernel, starts) + np.exp(rest - row_max)  # ≥ 1
        return kernel / np.repeat(row_sum, lengths[rows]), row_max + np.log(row_sum)

    log_scale = np.zeros(n_classes)
    if capacity is not None:
        capacity = np.asarray(capacity, dtype=np.float64)
        _check_capacity(n_rows, capacity, n_classes)

        def objective(log_scale: np.ndarray) -> tuple[float, np.ndarray]:
            total = -float(capacity @ log_scale)
            gradient = -capacity  # (K,) expected occupancy less capacity
            for rows, entries in blocks:
                responsibilities, log_normaliser = posterior(log_scale, rows, entries)
                total += float(log_normaliser.sum())
                gradient = gradient + np.bincount(scores.classes[entries], responsibilities, n_classes)
            return total, gradient

        start = log_scale if start_log_scale is None else np.minimum(start_log_scale, 0.0)
        log_scale = minimize(
            objective, start, jac=True, method="L-BFGS-B", bounds=[(None, 0.0)] * n_classes,
            options={"maxiter": max_iterations, "gtol": tolerance, "ftol": 0.0, "maxcor": 20},
        ).x
    responsibilities = np.empty(scores.scores.size)  # (E,)
    for rows, entries in blocks:
        responsibilities[entries] = posterior(log_scale, rows, entries)[0]
    return responsibilities


def _with_excluded_class(scores: ClassScores) -> ClassScores:
    """``scores`` with one more class, K, after each row's own entries in the rows that leave classes out, scoring
    their ``excluded_bound``."""
    partial = np.isfinite(scores.excluded_bound)
    row_start, classes, values = _widened(scores, np.diff(scores.row_start) + partial)
    last = row_start[1:][partial] - 1
    classes[last] = scores.n_classes
    values[last] = scores.excluded_bound[partial]
    no_rest = np.full(scores.n_rows, -np.inf)
    return ClassScores(row_start, classes, values, no_rest, no_rest.copy(), scores.n_classes + 1)


def _widened(scores: ClassScores, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of ``lengths`` (N,), each at least as long as now: their starts (N + 1,), and classes and scores (E',)
    with every row's present entries copied to the front of its run (the rest left to fill)."""
    row_start = np.concatenate([[0], np.cumsum(lengths)])
    positions = np.arange(scores.classes.size)  # (E,) each entry moves by how much its row's start moved
    positions += np.repeat(row_start[:-1] - scores.row_start[:-1], np.diff(scores.row_start))
    classes = np.empty(row_start[-1], dtype=np.int32)
    values = np.empty(row_start[-1], dtype=np.float64)
    classes[positions] = scores.classes
    values[positions] = scores.scores
    return row_start, classes, values


def _row_entries(row_start: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The entries of ``rows`` (R,) back to back: entry indices (L,), the position in ``rows`` of each (L,), and
    where each row's run starts (R,)."""
    starts = row_start[rows]
    lengths = row_start[rows + 1] - starts
    run_start = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    segments = np.repeat(np.arange(rows.size), lengths)
    entries = np.arange(int(lengths.sum()), dtype=np.int64) + np.repeat(starts - run_start, lengths)
    return entries, segments, run_start


def _run_argmax(values: np.ndarray, run_start: np.ndarray, segments: np.ndarray) -> np.ndarray:
    """Index into ``values`` (L,) of the first largest value of each run (runs non-empty, no NaN)."""
    run_max = np.maximum.reduceat(values, run_start)
    at_max = np.flatnonzero(values == run_max[segments])
    return at_max[np.flatnonzero(np.diff(segments[at_max], prepend=-1))]


def _assigned_entries(
    table: ClassScores,
    capacity: np.ndarray,
    max_warm_sweeps: int,
    start: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Each row's entry (N,) in the exact capped assignment of ``table``, and the class prices (K,) proving it.

    ``start``: entries and prices to continue from, with every particle at a best class under those prices and
    every class of positive price at or over its capacity.
    """
    n_rows, n_classes = table.n_rows, table.n_classes
    capacity = np.asarray(capacity)
    _check_capacity(n_rows, capacity.astype(np.float64), n_classes)
    if not np.all(np.floor(capacity) == capacity):
        raise ValueError("capacities of a hard assignment must be whole numbers")
    if n_rows and np.any(np.diff(table.row_start) == 0):
        raise ValueError(f"row {int(np.argmin(np.diff(table.row_start)))} lists no class")
    if np.isnan(table.scores).any():
        raise ValueError("scores must not be NaN")
    cap = np.minimum(capacity, n_rows).astype(np.int64)  # (K,)
    if start is None:
        # Prices (the duals of the capacity constraints) zero, every particle at its best class.
        prices = np.zeros(n_classes)
        entries = _run_argmax(table.scores, table.row_start[:-1], table.entry_row) if n_rows else np.zeros(0, int)
    else:
        entries, prices = start[0].copy(), start[1].copy()
    if n_rows == 0:
        return entries, prices
    entries = _raise_prices(table, cap, prices, entries, max_warm_sweeps)
    return _shortest_augmenting_paths(table, cap, prices, entries), prices


def _raise_prices(
    table: ClassScores, cap: np.ndarray, prices: np.ndarray, entries: np.ndarray, max_sweeps: int
) -> np.ndarray:
    """Warm start: raise each over-full class's price until only its ``cap`` most attached particles stay.

    Keeps the invariants the exact phase needs: every particle sits at a best class under ``prices`` and a class
    with a positive price holds at least its capacity (prices only rise, which only pushes particles into other
    classes). Stops when the overflow is small or stops shrinking (ties can leave a residue).
    """
    n_rows, n_classes = table.n_rows, table.n_classes
    # Below this overflow the exact phase (one particle per shortest path) is cheaper than more sweeps.
    handover = max(n_rows // 200, n_classes)
    best_overflow = n_rows + 1
    stalled_sweeps = 0
    for _ in range(max_sweeps):
        labels = table.classes[entries]
        counts = np.bincount(labels, minlength=n_classes)
        overflow = int(np.maximum(counts - cap, 0).sum())
        stalled_sweeps = stalled_sweeps + 1 if overflow >= best_overflow else 0
        best_overflow = min(best_overflow, overflow)
        if overflow <= handover or stalled_sweeps >= 3:
            break
        crowded = np.flatnonzero((counts > cap)[labels])  # (M,) particles in over-full classes
        own_class = labels[crowded]
        own_entry = entries[crowded]
        own = table.scores[own_entry]
        _, other = _best_other_entries(table, crowded, own_entry, prices)
        margin = own - prices[own_class] - other  # (M,)
        # Rank the particles of each over-full class from most to least attached; margin: how far the own class's
        # price may rise before the particle leaves.
        order = np.lexsort((-margin, own_class))
        sorted_class = own_class[order]
        rank = np.empty(crowded.size, dtype=np.int64)
        rank[order] = np.arange(crowded.size) - np.searchsorted(sorted_class, sorted_class, side="left")
        # The first particle beyond each class's capacity sets its price (none can if it has nowhere to go).
        at_capacity = (rank == cap[own_class]) & np.isfinite(margin)
        prices[own_class[at_capacity]] += margin[at_capacity]
        beyond = np.flatnonzero(rank >= cap[own_class])
        best, value = _best_other_entries(table, crowded[beyond], own_entry[beyond], prices)
        # A mover leaves only for a class at least as good under the new prices (other classes rose too).
        leaves = value >= own[beyond] - prices[own_class[beyond]]
        entries[crowded[beyond[leaves]]] = best[leaves]
    return entries


def _best_other_entries(
    table: ClassScores, rows: np.ndarray, own_entry: np.ndarray, prices: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Each of ``rows``' (R,) best entry other than its ``own_entry`` (R,) under ``prices``, and that entry's score
    less its class's price (−inf where the row lists nothing else), ``_BLOCK_ROWS`` rows at a time."""
    best = np.zeros(rows.size, dtype=np.int64)
    value = np.full(rows.size, -np.inf)
    for start in range(0, rows.size, _BLOCK_ROWS):
        chunk = slice(start, start + _BLOCK_ROWS)
        run_entries, segments, run_start = _row_entries(table.row_start, rows[chunk])
        values = table.scores[run_entries] - prices[table.classes[run_entries]]  # (L,)
        values[run_entries == own_entry[chunk][segments]] = -np.inf
        at = _run_argmax(values, run_start, segments)
        best[chunk] = run_entries[at]
        value[chunk] = values[at]
    return best, value


def _shortest_augmenting_paths(
    table: ClassScores, cap: np.ndarray, prices: np.ndarray, entries: np.ndarray
) -> np.ndarray:
    """Exact phase: move one surplus particle at a time along a cheapest chain of class changes.

    The cost of moving particle j from class a to class b is its loss of price-adjusted score, non-negative
    because j sits at a best class. Dijkstra over the K classes (edge a→b: the cheapest particle of a) from the
    over-full classes finds the nearest class with room; raising prices by the distances keeps every particle
    at a best class and makes the path free, so the final assignment is optimal with ``prices`` as its duals.

    A particle's loss of moving from a to b does not depend on prices, so each edge keeps its
    ``_EDGE_CANDIDATES`` cheapest particles from the last scan of its class; when particles leave a class its
    edges fall back on the next candidates still there (and those that joined since), and the class's members
    are scanned again only when an edge has used up its candidates.
    """
    n_classes = table.n_classes
    labels = table.classes[entries].astype(np.int64)  # (N,) each particle's class, kept current
    counts = np.bincount(labels, minlength=n_classes)
    cheapest = np.full((n_classes, n_classes), np.inf)  # (K, K) min over j in a of score(j, a) - score(j, b)
    cheapest_entry = np.zeros((n_classes, n_classes), dtype=np.int64)  # (K, K) the entry (j, b) attaining it
    # Each class's edges' cheapest particles at its last scan, by (loss, particle): (K, K, C) from-class, to-class.
    candidates_shape = (n_classes, n_classes, _EDGE_CANDIDATES)
    candidate_loss = np.full(candidates_shape, np.inf)
    candidate_particle = np.full(candidates_shape, -1, dtype=np.int64)
    candidate_entry = np.zeros(candidates_shape, dtype=np.int64)
    truncated = np.zeros((n_classes, n_classes), dtype=bool)  # (K, K) more particles had the edge than were kept
    joined: list[list[int]] = [[] for _ in range(n_classes)]  # particles that joined each class since its scan
    by_class = np.argsort(labels, kind="stable")
    members = np.split(by_class, np.cumsum(counts)[:-1])  # each class's particles, ascending
    every_class = np.arange(n_classes)

    def edges(a: int, particles: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(entry, class, loss, particle) of moving each of ``particles`` (in class a) to each other class it lists."""
        run_entries, segments, _ = _row_entries(table.row_start, particles)
        loss = table.scores[entries[particles]][segments] - table.scores[run_entries]
        target = table.classes[run_entries]
        elsewhere = target != a
        return run_entries[elsewhere], target[elsewhere], loss[elsewhere], particles[segments[elsewhere]]

    def fold(a: int, particles: np.ndarray) -> None:
        """Lower row a's cheapest edges by those of ``particles`` (in class a); ties go to the lower particle."""
        run_entries, target, loss, particle = edges(a, particles)
        order = np.lexsort((particle, loss))
        target, first = np.unique(target[order], return_index=True)
        run_entries, loss, particle = run_entries[order[first]], loss[order[first]], particle[order[first]]
        incumbent = np.searchsorted(table.row_start, cheapest_entry[a, target], side="right") - 1
        better = (loss < cheapest[a, target]) | ((loss == cheapest[a, target]) & (particle < incumbent))
        cheapest[a, target[better]] = loss[better]
        cheapest_entry[a, target[better]] = run_entries[better]

    def scan(a: int) -> None:
        """Row a's edges and candidates from all its members."""
        joined[a] = []
        cheapest[a] = np.inf
        candidate_loss[a] = np.inf
        candidate_particle[a] = -1
        run_entries, target, loss, particle = edges(a, members[a])
        order = np.lexsort((particle, loss, target))
        target = target[order]
        rank = np.arange(target.size) - np.searchsorted(target, target, side="left")
        truncated[a] = np.bincount(target, minlength=n_classes) > _EDGE_CANDIDATES
        kept = rank < _EDGE_CANDIDATES
        chosen, target, rank = order[kept], target[kept], rank[kept]
        candidate_loss[a, target, rank] = loss[chosen]
        candidate_particle[a, target, rank] = particle[chosen]
        candidate_entry[a, target, rank] = run_entries[chosen]
        head = rank == 0
        cheapest[a, target[head]] = loss[chosen[head]]
        cheapest_entry[a, target[head]] = run_entries[chosen[head]]

    def refresh(a: int) -> None:
        """Row a's edges after some of its particles left: the first candidates still in a, and the joiners'."""
        present = (labels[np.maximum(candidate_particle[a], 0)] == a) & (candidate_particle[a] >= 0)  # (K, C)
        remaining = present.any(axis=1)
        if np.any(~remaining & truncated[a]):
            scan(a)
            return
        first = present.argmax(axis=1)
        cheapest[a] = np.where(remaining, candidate_loss[a, every_class, first], np.inf)
        cheapest_entry[a] = candidate_entry[a, every_class, first]
        stayed = [particle for particle in joined[a] if labels[particle] == a]
        if stayed:
            fold(a, np.unique(stayed))

    for a in range(n_classes):
        scan(a)

    while True:
        surplus = np.flatnonzero(counts > cap)
        if surplus.size == 0:
            return entries
        reduced = np.maximum(cheapest - prices[:, None] + prices[None, :], 0.0)  # rounding can dip below 0
        graph = csgraph_from_dense(reduced, null_value=np.inf)
        distance, predecessor, _ = dijkstra(graph, indices=surplus, min_only=True, return_predecessors=True)
        with_room = np.flatnonzero(counts < cap)
        target = with_room[np.argmin(distance[with_room])]
        if not np.isfinite(distance[target]):
            raise ValueError(
                f"the listed classes cannot hold every particle: class {int(surplus[0])} is over its capacity and "
                "none of its particles lists a class with room"
            )
        prices += np.maximum(distance[target] - distance, 0.0)  # unreached classes (inf) keep their price

        moves = []
        node = target
        while predecessor[node] >= 0:
            source = int(predecessor[node])
            moves.append((int(cheapest_entry[source, node]), source, int(node)))
            node = source
        counts[node] -= 1
        counts[target] += 1
        moved = [(int(np.searchsorted(table.row_start, entry, side="right") - 1), entry, source, destination)
                 for entry, source, destination in moves]  # (particle, its new entry, from, to)
        for particle, entry, source, destination in moved:
            members[source] = members[source][members[source] != particle]
            entries[particle] = entry
            labels[particle] = destination
        # A class that lost a particle may have lost its cheapest edges and is refreshed; one that only gained
        # a particle can only see its cheapest edges lowered by the newcomer's.
        sources = {source for _, _, source, _ in moved}
        for particle, _, _, destination in moved:
            members[destination] = np.insert(
                members[destination], np.searchsorted(members[destination], particle), particle
            )
            joined[destination].append(particle)
            if destination not in sources:
                fold(destination, np.array([particle]))
        for a in sources:
            refresh(a)
