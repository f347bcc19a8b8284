"""The capped E-step: soft responsibilities and the exact hard assignment never exceed a class's capacity."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import sparse
from scipy.optimize import linear_sum_assignment, linprog

from cryostack.core import capacity as capacity_module
from cryostack.core.capacity import (
    ClassScores,
    batch_capacity,
    capped_assignment,
    capped_assignment_with_rescoring,
    capped_responsibilities,
    class_responsibilities,
    top_class_columns,
)


def _random_capacity(rng: np.random.Generator, n_rows: int, n_classes: int) -> np.ndarray:
    """Random whole-number capacities that sum to at least ``n_rows`` (often exactly, the tightest case)."""
    capacity = rng.integers(0, max(n_rows // n_classes, 1) + 2, size=n_classes)
    while capacity.sum() < n_rows:
        capacity[rng.integers(n_classes)] += 1
    return capacity


def _slot_optimum(scores: np.ndarray, capacity: np.ndarray) -> float:
    """Best total score by the Hungarian algorithm on one column per capacity slot (independent reference)."""
    slot_class = np.repeat(np.arange(scores.shape[1]), capacity)
    rows, slots = linear_sum_assignment(-scores[:, slot_class])
    return float(scores[rows, slot_class[slots]].sum())


@pytest.mark.parametrize("seed", range(40))
def test_hard_assignment_is_optimal_and_within_capacity(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_rows, n_classes = int(rng.integers(1, 45)), int(rng.integers(1, 8))
    scores = rng.normal(size=(n_rows, n_classes)) * rng.choice([0.01, 1.0, 300.0]) + rng.normal(size=n_classes)
    if seed % 3 == 0:
        scores = np.round(scores)  # many exact ties
    capacity = _random_capacity(rng, n_rows, n_classes)

    labels = capped_assignment(scores, capacity)

    assert labels.shape == (n_rows,)
    assert np.all(np.bincount(labels, minlength=n_classes) <= capacity)
    total = scores[np.arange(n_rows), labels].sum()
    optimum = _slot_optimum(scores, capacity)
    assert total == pytest.approx(optimum, rel=1e-12, abs=1e-9)


def test_hard_assignment_matches_linear_program_with_a_crowded_class() -> None:
    rng = np.random.default_rng(7)
    n_rows, n_classes = 900, 15
    # One class every particle prefers, as when classes collapse onto the stable part of a protein.
    scores = rng.normal(size=(n_rows, n_classes)) * 3.0 + np.linspace(0.0, 30.0, n_classes)
    capacity = np.full(n_classes, 2 * n_rows // n_classes)

    labels = capped_assignment(scores, capacity)

    assert np.bincount(labels, minlength=n_classes).max() <= capacity[0]
    # The transportation LP is totally unimodular: its optimum is the optimum over whole assignments.
    columns = np.arange(n_rows * n_classes)
    one_class_each = sparse.csr_matrix(
        (np.ones(columns.size), (np.repeat(np.arange(n_rows), n_classes), columns)), shape=(n_rows, columns.size)
    )
    class_totals = sparse.csr_matrix(
        (np.ones(columns.size), (np.tile(np.arange(n_classes), n_rows), columns)), shape=(n_classes, columns.size)
    )
    result = linprog(
        -scores.ravel(), A_ub=class_totals, b_ub=capacity, A_eq=one_class_each, b_eq=np.ones(n_rows),
        bounds=(0, 1), method="highs",
    )
    assert result.status == 0
    assert scores[np.arange(n_rows), labels].sum() == pytest.approx(-result.fun, rel=1e-10)


@pytest.mark.parametrize("seed", range(6))
def test_exact_phase_gives_the_same_assignment_whatever_it_keeps_per_pair_of_classes(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(200 + seed)
    n_rows, n_classes = 300, 8
    # Most particles prefer the last classes; rounding makes ties, which must be broken the same way.
    scores = np.round(rng.normal(size=(n_rows, n_classes)) * 2.0 + np.linspace(0.0, 6.0, n_classes))
    capacity = _random_capacity(rng, n_rows, n_classes)

    # No warm start: every surplus particle moves along a shortest path, draining each pair's candidates.
    labels = {}
    for kept in (1, 2, 64):
        monkeypatch.setattr(capacity_module, "_EDGE_CANDIDATES", kept)
        labels[kept] = capped_assignment(scores, capacity, max_warm_sweeps=0)

    assert np.all(np.bincount(labels[64], minlength=n_classes) <= capacity)
    assert scores[np.arange(n_rows), labels[64]].sum() == pytest.approx(_slot_optimum(scores, capacity), rel=1e-12)
    np.testing.assert_array_equal(labels[1], labels[64])
    np.testing.assert_array_equal(labels[2], labels[64])


def test_price_raising_takes_rows_in_chunks_without_changing_the_assignment(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(9)
    n_rows, n_classes = 2000, 10
    scores = np.round(rng.normal(size=(n_rows, n_classes)) * 3.0 + np.linspace(0.0, 12.0, n_classes))
    capacity = np.full(n_classes, n_rows // n_classes)

    whole = capped_assignment(scores, capacity)
    monkeypatch.setattr(capacity_module, "_BLOCK_ROWS", 7)
    chunked = capped_assignment(scores, capacity)

    np.testing.assert_array_equal(chunked, whole)
    assert scores[np.arange(n_rows), whole].sum() == pytest.approx(_slot_optimum(scores, capacity), rel=1e-12)


def test_hard_assignment_without_a_binding_cap_is_the_argmax() -> None:
    rng = np.random.default_rng(3)
    scores = rng.normal(size=(200, 6))
    labels = capped_assignment(scores, np.full(6, 200))
    np.testing.assert_array_equal(labels, np.argmax(scores, axis=1))


def test_hard_assignment_rejects_too_little_capacity_and_fractions() -> None:
    scores = np.zeros((10, 3))
    with pytest.raises(ValueError, match="fewer than the 10 particles"):
        capped_assignment(scores, np.array([3, 3, 3]))
    with pytest.raises(ValueError, match="whole numbers"):
        capped_assignment(scores, np.array([3.5, 3.5, 3.5]))


def _best_columns(scores: np.ndarray, count: int) -> ClassScores:
    top, bound, log_mass = top_class_columns(scores, count)
    return ClassScores.from_columns(top, np.take_along_axis(scores, top, axis=1), bound, log_mass, scores.shape[1])


@pytest.mark.parametrize("seed", range(24))
def test_assignment_from_each_particles_best_classes_is_the_exact_one(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    n_rows, n_classes = int(rng.integers(20, 400)), int(rng.integers(2, 12))
    scores = rng.normal(size=(n_rows, n_classes)) * rng.choice([0.5, 5.0]) + rng.normal(size=n_classes) * 4.0
    capacity = _random_capacity(rng, n_rows, n_classes)
    kept = int(rng.integers(1, n_classes + 1))
    asked: list[np.ndarray] = []

    def score_rows(rows: np.ndarray) -> np.ndarray:
        asked.append(rows)
        return scores[rows]

    entries, final, prices = capped_assignment_with_rescoring(_best_columns(scores, kept), capacity, score_rows)

    labels = final.classes[entries]
    assert np.all(np.bincount(labels, minlength=n_classes) <= capacity)
    np.testing.assert_array_equal(final.scores[entries], scores[np.arange(n_rows), labels])
    assert scores[np.arange(n_rows), labels].sum() == pytest.approx(_slot_optimum(scores, capacity), rel=1e-12)
    # The prices certify it: every particle at a best class over all K, and only full classes priced.
    adjusted = scores - prices[None, :]
    assert np.all(adjusted[np.arange(n_rows), labels] >= adjusted.max(axis=1) - 1e-9)
    assert np.all(prices >= 0.0)
    assert np.all(np.bincount(labels, minlength=n_classes)[prices > 1e-9] == capacity[prices > 1e-9])
    rescored = np.concatenate(asked) if asked else np.zeros(0, dtype=np.int64)
    assert np.unique(rescored).size == rescored.size  # no particle is scored twice
    if kept == n_classes:
        assert not asked
    # Whoever left its kept classes was scored against every class first.
    order = np.argsort(-scores, axis=1, kind="stable")
    beyond = np.flatnonzero(np.argmax(order == labels[:, None], axis=1) >= kept)
    assert np.all(np.isin(beyond, rescored))


def test_a_tight_cap_sends_some_particles_beyond_their_best_classes_and_they_are_rescored() -> None:
    rng = np.random.default_rng(11)
    n_rows, n_classes = 600, 6
    scores = rng.normal(size=(n_rows, n_classes)) + np.linspace(0.0, 3.0, n_classes)  # all prefer the last classes
    asked: list[int] = []

    def score_rows(rows: np.ndarray) -> np.ndarray:
        asked.append(rows.size)
        return scores[rows]

    entries, final, _ = capped_assignment_with_rescoring(_best_columns(scores, 2), np.full(n_classes, 100), score_rows)

    assert sum(asked) > 0
    np.testing.assert_array_equal(np.bincount(final.classes[entries], minlength=n_classes), np.full(n_classes, 100))
    np.testing.assert_array_equal(final.classes[entries], capped_assignment(scores, np.full(n_classes, 100)))


def test_rows_listing_too_few_classes_for_the_capacities_are_refused() -> None:
    scores = ClassScores.from_columns(
        np.zeros((10, 1), dtype=np.int64), np.zeros((10, 1)), np.full(10, -np.inf), np.full(10, -np.inf), 3
    )
    with pytest.raises(ValueError, match="cannot hold every particle"):
        capped_assignment(scores, np.array([4, 4, 4]))


def test_best_classes_come_first_with_the_bound_and_mass_of_the_rest() -> None:
    rng = np.random.default_rng(4)
    scores = rng.normal(size=(30, 7)) * 3.0
    top, bound, log_mass = top_class_columns(scores, 3)

    np.testing.assert_array_equal(top, np.argsort(-scores, axis=1)[:, :3])
    rest = np.argsort(-scores, axis=1)[:, 3:]
    np.testing.assert_allclose(bound, np.take_along_axis(scores, rest, axis=1).max(axis=1))
    np.testing.assert_allclose(log_mass, np.log(np.exp(np.take_along_axis(scores, rest, axis=1)).sum(axis=1)))
    every, no_bound, no_mass = top_class_columns(scores, 7)
    np.testing.assert_array_equal(every, np.argsort(-scores, axis=1))
    assert np.all(no_bound == -np.inf) and np.all(no_mass == -np.inf)
    tied, _, _ = top_class_columns(np.zeros((2, 5)), 5)
    np.testing.assert_array_equal(tied, np.tile(np.arange(5), (2, 1)))  # ties in class order, as argmax


def test_entry_responsibilities_are_the_posterior_and_the_capped_posterior() -> None:
    rng = np.random.default_rng(8)
    n_rows, n_classes = 300, 6
    log_weights = rng.normal(size=(n_rows, n_classes)) * 2.0 + np.linspace(0.0, 3.0, n_classes)
    posterior = np.exp(log_weights - log_weights.max(axis=1, keepdims=True))
    posterior /= posterior.sum(axis=1, keepdims=True)

    # Uncapped, keeping only the best classes loses nothing: the rest's mass stays in the denominator.
    kept = _best_columns(log_weights, 2)
    np.testing.assert_allclose(class_responsibilities(kept, None),
                               posterior[kept.entry_row, kept.classes], rtol=1e-12)
    # Capped with every class listed, it is the Sinkhorn–Knopp scaling of the dense E-step.
    capacity = np.full(n_classes, 1.2 * n_rows / n_classes)
    dense = ClassScores.dense(log_weights)
    sparse_capped = class_responsibilities(dense, capacity, tolerance=1e-9)
    dense_capped = capped_responsibilities(log_weights, capacity, tolerance=1e-12, max_iterations=20_000)
    np.testing.assert_allclose(sparse_capped.reshape(n_rows, n_classes), dense_capped, rtol=1e-6, atol=1e-9)
    assert np.all(sparse_capped.reshape(n_rows, n_classes).sum(axis=0) <= capacity * (1 + 1e-6))
    # Started from a hard assignment's prices, it reaches the same scaling.
    _, _, prices = capped_assignment_with_rescoring(dense, np.floor(capacity), lambda rows: log_weights[rows])
    warm = class_responsibilities(dense, capacity, start_log_scale=-prices, tolerance=1e-9)
    np.testing.assert_allclose(warm, sparse_capped, rtol=1e-6, atol=1e-9)


def test_entry_responsibilities_come_out_the_same_in_blocks_of_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(10)
    n_rows, n_classes = 500, 8
    log_weights = rng.normal(size=(n_rows, n_classes)) * 3.0 + np.linspace(0.0, 6.0, n_classes)
    kept = _best_columns(log_weights, 3)
    capacity = np.full(n_classes, n_rows / n_classes)

    whole = [class_responsibilities(kept, None), class_responsibilities(kept, capacity, tolerance=1e-9)]
    monkeypatch.setattr(capacity_module, "_BLOCK_ROWS", 7)
    blocks = [class_responsibilities(kept, None), class_responsibilities(kept, capacity, tolerance=1e-9)]

    np.testing.assert_allclose(blocks[0], whole[0], rtol=1e-12)
    np.testing.assert_allclose(blocks[1], whole[1], rtol=1e-6, atol=1e-12)
    assert np.bincount(kept.classes, blocks[1], n_classes).max() <= capacity[0] + 1e-6


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("scale", [0.1, 3.0, 50.0, 2000.0])
def test_entry_responsibilities_respect_the_capacities_however_peaked_the_scores(seed: int, scale: float) -> None:
    rng = np.random.default_rng(300 + seed)
    n_rows, n_classes = int(rng.integers(1, 300)), int(rng.integers(1, 12))
    log_weights = rng.normal(size=(n_rows, n_classes)) * scale + rng.normal(size=n_classes) * scale
    capacity = _random_capacity(rng, n_rows, n_classes).astype(np.float64)  # some classes may hold nobody
    table = ClassScores.dense(log_weights)

    responsibilities = class_responsibilities(table, capacity)

    assert np.all(np.isfinite(responsibilities)) and np.all(responsibilities >= 0.0)
    np.testing.assert_allclose(responsibilities.reshape(n_rows, n_classes).sum(axis=1), 1.0, rtol=1e-12)
    occupancy = responsibilities.reshape(n_rows, n_classes).sum(axis=0)
    assert np.all(occupancy <= capacity + 1e-3)  # the default tolerance, in particles


@pytest.mark.parametrize("seed", range(30))
@pytest.mark.parametrize("scale", [0.1, 3.0, 50.0, 2000.0])
def test_soft_responsibilities_never_exceed_capacity(seed: int, scale: float) -> None:
    rng = np.random.default_rng(seed)
    n_rows, n_classes = int(rng.integers(1, 300)), int(rng.integers(1, 12))
    log_weights = rng.normal(size=(n_rows, n_classes)) * scale + rng.normal(size=n_classes) * scale
    capacity = _random_capacity(rng, n_rows, n_classes).astype(np.float64) * rng.uniform(1.0, 1.3)

    responsibilities = capped_responsibilities(log_weights, capacity, max_iterations=200)

    assert np.all(responsibilities >= 0)
    np.testing.assert_allclose(responsibilities.sum(axis=1), 1.0, atol=1e-12)
    assert np.all(responsibilities.sum(axis=0) <= capacity * (1 + 1e-12) + 1e-12)


def test_soft_responsibilities_without_a_binding_cap_are_the_posterior() -> None:
    rng = np.random.default_rng(1)
    log_weights = rng.normal(size=(50, 4)) * 2.0
    posterior = np.exp(log_weights - log_weights.max(axis=1, keepdims=True))
    posterior /= posterior.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(capped_responsibilities(log_weights, np.full(4, 50.0)), posterior, rtol=1e-12)


def test_soft_responsibilities_satisfy_the_optimality_conditions() -> None:
    """The result is diag(u)·exp(L)·diag(v) with v ≤ 1, and v < 1 only on columns filled to capacity."""
    rng = np.random.default_rng(5)
    n_rows, n_classes = 400, 8
    log_weights = rng.normal(size=(n_rows, n_classes)) + np.linspace(0.0, 4.0, n_classes)
    capacity = np.full(n_classes, 1.25 * n_rows / n_classes)

    responsibilities = capped_responsibilities(log_weights, capacity, tolerance=1e-12, max_iterations=20_000)

    log_ratio = np.log(responsibilities) - log_weights  # (N, K) = log u_i + log v_k
    log_column_scale = (log_ratio - log_ratio[:, :1]).mean(axis=0)
    np.testing.assert_allclose(log_ratio - log_ratio[:, :1], np.broadcast_to(log_column_scale, log_ratio.shape),
                               atol=1e-8)
    log_column_scale -= log_column_scale.max()
    occupancy = responsibilities.sum(axis=0)
    saturated = log_column_scale < -1e-6
    assert saturated.any() and not saturated.all()
    np.testing.assert_allclose(occupancy[saturated], capacity[saturated], rtol=1e-8)
    assert np.all(occupancy[~saturated] <= capacity[~saturated])


def test_batch_capacity_is_the_batch_share() -> None:
    np.testing.assert_allclose(batch_capacity(np.array([100.0, 300.0]), 50, 1000), [5.0, 15.0])
