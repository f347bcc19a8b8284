"""The capped E-step: soft responsibilities and the exact hard assignment never exceed a class's capacity."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import sparse
from scipy.optimize import linear_sum_assignment, linprog

from cryostack.services.classify2d.capacity import batch_capacity, capped_assignment, capped_responsibilities


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
