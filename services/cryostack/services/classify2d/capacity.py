"""The per-class particle cap inside the E-step.

Two operations keep class occupancy within a capacity:

* :func:`capped_responsibilities` — soft assignment. The responsibilities ``R = diag(u) P diag(v)`` with
  ``P = exp(log_weights)`` are scaled (Sinkhorn–Knopp) so that every row sums to one and every column sums to at
  most its capacity. This is the entropic optimal-transport problem with upper-bounded column marginals; the
  column scaling ``v_k = min(1, capacity_k / (Pᵀu)_k)`` is exact coordinate ascent on its dual, so a class below
  its capacity is left untouched and an uncapped run reduces to the ordinary posterior.
* :func:`capped_assignment` — hard assignment. The exact maximum-score assignment of N particles to K classes
  with at most ``capacity_k`` particles in class k (a transportation problem), solved by successive shortest
  paths over the K class nodes with class prices as duals, warm-started by Jacobi price raising.

Both accept any capacities whose sum is at least the number of particles.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.sparse.csgraph import csgraph_from_dense, dijkstra

from cryostack.core.backend import array_module, to_host


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


def capped_assignment(scores: Any, capacity: np.ndarray, *, max_warm_sweeps: int = 200) -> np.ndarray:
    """Exact maximum-total-score class of each particle with at most ``capacity[k]`` particles in class k."""
    scores = to_host(scores).astype(np.float64, copy=False)  # (N, K); host: the combinatorial step is serial
    n_rows, n_classes = scores.shape
    capacity = np.asarray(capacity)
    _check_capacity(n_rows, capacity.astype(np.float64), n_classes)
    if not np.all(np.floor(capacity) == capacity):
        raise ValueError("capacities of a hard assignment must be whole numbers")
    cap = np.minimum(capacity, n_rows).astype(np.int64)  # (K,)

    prices = np.zeros(n_classes)  # (K,) dual of each class's capacity constraint, zero unless the class is full
    labels = np.argmax(scores, axis=1)  # (N,) every particle at its best price-adjusted class
    labels = _raise_prices(scores, cap, prices, labels, max_warm_sweeps)
    return _shortest_augmenting_paths(scores, cap, prices, labels)


def _raise_prices(
    scores: np.ndarray, cap: np.ndarray, prices: np.ndarray, labels: np.ndarray, max_sweeps: int
) -> np.ndarray:
    """Warm start: raise each over-full class's price until only its ``cap`` most attached particles stay.

    Keeps the invariants the exact phase needs: every particle sits at a best class under ``prices`` and a class
    with a positive price holds at least its capacity (prices only rise, which only pushes particles into other
    classes). Stops when the overflow is small or stops shrinking (ties can leave a residue).
    """
    n_classes = scores.shape[1]
    # Below this overflow the exact phase (one particle per shortest path) is cheaper than more sweeps.
    handover = max(scores.shape[0] // 200, n_classes)
    best_overflow = scores.shape[0] + 1
    stalled_sweeps = 0
    for _ in range(max_sweeps):
        counts = np.bincount(labels, minlength=n_classes)
        overflow = int(np.maximum(counts - cap, 0).sum())
        stalled_sweeps = stalled_sweeps + 1 if overflow >= best_overflow else 0
        best_overflow = min(best_overflow, overflow)
        if overflow <= handover or stalled_sweeps >= 3:
            break
        crowded = np.flatnonzero((counts > cap)[labels])  # (M,) particles in over-full classes
        own_class = labels[crowded]
        values = scores[crowded] - prices[None, :]  # (M, K)
        rows = np.arange(crowded.size)
        own = values[rows, own_class].copy()
        values[rows, own_class] = -np.inf
        margin = own - values.max(axis=1)  # (M,) how far the own class's price may rise before i leaves
        # Rank the particles of each over-full class from most to least attached.
        order = np.lexsort((-margin, own_class))
        sorted_class = own_class[order]
        rank = np.empty(crowded.size, dtype=np.int64)
        rank[order] = np.arange(crowded.size) - np.searchsorted(sorted_class, sorted_class, side="left")
        at_capacity = rank == cap[own_class]  # the first particle beyond each class's capacity sets its price
        prices[own_class[at_capacity]] += margin[at_capacity]
        movers = rank >= cap[own_class]
        values = scores[crowded[movers]] - prices[None, :]  # (L, K)
        mover_rows = np.arange(values.shape[0])
        stay_value = values[mover_rows, own_class[movers]].copy()
        values[mover_rows, own_class[movers]] = -np.inf
        best = np.argmax(values, axis=1)
        # A mover leaves only for a class at least as good under the new prices (other classes rose too).
        leaves = values[mover_rows, best] >= stay_value
        labels[crowded[movers][leaves]] = best[leaves]
    return labels


def _shortest_augmenting_paths(
    scores: np.ndarray, cap: np.ndarray, prices: np.ndarray, labels: np.ndarray
) -> np.ndarray:
    """Exact phase: move one surplus particle at a time along a cheapest chain of class changes.

    The cost of moving particle j from class a to class b is its loss of price-adjusted score, non-negative
    because j sits at a best class. Dijkstra over the K classes (edge a→b: the cheapest particle of a) from the
    over-full classes finds the nearest class with room; raising prices by the distances keeps every particle
    at a best class and makes the path free, so the final assignment is optimal with ``prices`` as its duals.
    """
    n_classes = scores.shape[1]
    counts = np.bincount(labels, minlength=n_classes)
    cheapest = np.full((n_classes, n_classes), np.inf)  # (K, K) min over j in a of scores[j,a] - scores[j,b]
    cheapest_particle = np.zeros((n_classes, n_classes), dtype=np.int64)  # (K, K) the j attaining it

    def refresh_row(a: int) -> None:
        members = np.flatnonzero(labels == a)
        if members.size == 0:
            cheapest[a] = np.inf
            return
        loss = scores[members, a][:, None] - scores[members]  # (n_a, K)
        loss[:, a] = np.inf
        best = np.argmin(loss, axis=0)
        cheapest[a] = loss[best, np.arange(n_classes)]
        cheapest_particle[a] = members[best]

    for a in range(n_classes):
        refresh_row(a)

    while True:
        surplus = np.flatnonzero(counts > cap)
        if surplus.size == 0:
            return labels
        reduced = np.maximum(cheapest - prices[:, None] + prices[None, :], 0.0)  # rounding can dip below 0
        graph = csgraph_from_dense(reduced, null_value=np.inf)
        distance, predecessor, _ = dijkstra(graph, indices=surplus, min_only=True, return_predecessors=True)
        with_room = np.flatnonzero(counts < cap)
        target = with_room[np.argmin(distance[with_room])]
        prices += np.maximum(distance[target] - distance, 0.0)  # unreached classes (inf) keep their price

        moves = []
        node = target
        while predecessor[node] >= 0:
            source = int(predecessor[node])
            moves.append((int(cheapest_particle[source, node]), source, int(node)))
            node = source
        for particle, _, destination in moves:
            labels[particle] = destination
        counts[node] -= 1
        counts[target] += 1
        for a in {source for _, source, _ in moves} | {target}:
            refresh_row(a)
