"""Ground-truth metrics: clustering scores against scikit-learn, rank correlation, class occupancy, pose errors up
to a global rotation and hand, and map alignment with a hand check on a real asymmetric map."""

from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np
import pytest
import scipy.stats

from cryostack.core.fsc import fsc_curve
from cryostack.core.geometry import uniform_random_rotations
from cryostack.core.metrics import (
    class_purity,
    adjusted_rand_index,
    align_map,
    class_occupancy,
    compare_to_reference,
    contingency_table,
    gini_coefficient,
    normalized_mutual_information,
    rotation_error,
    spearman_correlation,
    transform_map,
)
from cryostack.core.poses import rotation_angle_deg
from cryostack.core.projection import Projector
from cryostack.errors import InvalidArgumentError

sklearn_metrics = pytest.importorskip("sklearn.metrics", reason="scikit-learn (dev dependency) is not installed")

MIRROR = np.diag([1.0, 1.0, -1.0])


def _labelings() -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 4, 300)
    noisy = np.where(rng.random(300) < 0.2, rng.integers(0, 6, 300), truth)
    return [
        (truth, noisy),
        (truth, rng.integers(0, 7, 300)),  # unrelated
        (truth, (truth * 3 + 5) % 11),  # the same partition under other names
        (truth, np.zeros(300, dtype=int)),  # one cluster
        (np.zeros(50, dtype=int), np.zeros(50, dtype=int)),
        (np.arange(40), np.arange(40)[::-1]),  # every item alone
        (np.array(["a", "b", "b", "c"]), np.array([1, 1, 2, 2])),
    ]


@pytest.mark.parametrize("case", range(7))
def test_ari_and_nmi_match_scikit_learn(case: int) -> None:
    truth, predicted = _labelings()[case]
    assert adjusted_rand_index(truth, predicted) == pytest.approx(
        sklearn_metrics.adjusted_rand_score(truth, predicted), abs=1e-12
    )
    assert normalized_mutual_information(truth, predicted) == pytest.approx(
        sklearn_metrics.normalized_mutual_info_score(truth, predicted), abs=1e-12
    )


def test_contingency_table_counts_pairs() -> None:
    table = contingency_table(np.array([2, 2, 5, 5, 5]), np.array([0, 1, 1, 1, 0]))
    np.testing.assert_array_equal(table, [[1, 1], [1, 2]])
    with pytest.raises(InvalidArgumentError):
        contingency_table(np.array([1, 2]), np.array([1]))


def test_spearman_correlation() -> None:
    rng = np.random.default_rng(1)
    angle = rng.uniform(0, 60, 200)
    assert spearman_correlation(np.exp(angle / 10), angle) == pytest.approx(1.0)
    assert spearman_correlation(-(angle**3), angle) == pytest.approx(-1.0)
    noisy = np.round(angle + rng.normal(0, 15, 200))  # with ties
    assert spearman_correlation(noisy, angle) == pytest.approx(scipy.stats.spearmanr(noisy, angle).statistic)


def test_class_occupancy_statistics() -> None:
    labels = np.concatenate([np.full(50, 0), np.full(45, 1), np.full(3, 2), np.full(2, 4)])  # class 3 empty
    occupancy = class_occupancy(labels, n_classes=5, tiny_fraction=0.2)  # tiny: < 0.2 · 100 / 5 = 4
    np.testing.assert_array_equal(occupancy.counts, [50, 45, 3, 0, 2])
    assert (occupancy.n_empty, occupancy.n_tiny, occupancy.min_count, occupancy.max_count) == (1, 2, 0, 50)
    assert gini_coefficient(np.full(8, 10)) == 0.0
    assert gini_coefficient(np.array([0, 0, 0, 12])) == pytest.approx(0.75)  # one of K holds all: 1 - 1/K
    # Against the mean-absolute-difference definition.
    counts = occupancy.counts.astype(float)
    expected = np.abs(counts[:, None] - counts[None, :]).sum() / (2 * counts.size**2 * counts.mean())
    assert occupancy.gini == pytest.approx(expected)
    with pytest.raises(InvalidArgumentError):
        class_occupancy(np.array([0, 5]), n_classes=3)


def test_rotation_error_of_a_globally_rotated_pose_set_is_zero() -> None:
    rng = np.random.default_rng(2)
    truth = uniform_random_rotations(400, rng)
    global_rotation = uniform_random_rotations(1, rng)[0]
    estimate = truth @ global_rotation
    result = rotation_error(estimate, truth)
    assert result.median_deg < 1e-6 and result.mean_deg < 1e-6 and not result.flipped
    np.testing.assert_allclose(result.global_rotation, global_rotation, atol=1e-9)
    # With 1° jitter and 10% outright wrong poses the error stays that of the good poses.
    jitter = uniform_random_rotations(400, rng)
    small = np.array([_small_rotation(rng, 1.0) for _ in range(400)])
    noisy = truth @ small @ global_rotation
    noisy[:40] = jitter[:40]
    result = rotation_error(noisy, truth)
    assert 0.5 < result.median_deg < 1.5
    assert rotation_angle_deg(result.global_rotation, global_rotation) < 0.3


def test_rotation_error_finds_the_hand() -> None:
    rng = np.random.default_rng(3)
    truth = uniform_random_rotations(200, rng)
    global_rotation = uniform_random_rotations(1, rng)[0]
    mirrored = MIRROR @ truth @ MIRROR @ global_rotation
    assert rotation_error(mirrored, truth).median_deg > 30.0
    result = rotation_error(mirrored, truth, allow_flip=True)
    assert result.flipped and result.median_deg < 1e-6


def test_rotation_error_of_random_poses_is_large() -> None:
    rng = np.random.default_rng(4)
    result = rotation_error(uniform_random_rotations(1000, rng), uniform_random_rotations(1000, rng))
    # Uniform relative rotations have a median angle of about 126°; fitting one global rotation lowers it a little.
    assert 100.0 < result.median_deg < 130.0
    # Viewing directions of random poses are 90° apart on average.
    assert 80.0 < result.median_direction_deg < 100.0


def test_pose_conventions_match_the_projector(hand_volume: np.ndarray) -> None:
    """Poses A·Gᵀ of a map rotated by G, and M·A·M of a mirrored map, give the original projections."""
    rng = np.random.default_rng(5)
    volume = hand_volume
    poses = uniform_random_rotations(6, rng)
    rotation = uniform_random_rotations(1, rng)[0]
    reference = Projector(volume).project(poses)
    rotated = Projector(transform_map(volume, rotation))
    right = _correlations(reference, rotated.project(poses @ rotation.T))
    wrong = _correlations(reference, rotated.project(poses @ rotation))
    assert right.min() > 0.98 and wrong.mean() < 0.95
    mirrored = Projector(transform_map(volume, np.eye(3), flip=True))
    assert _correlations(reference, mirrored.project(MIRROR @ poses @ MIRROR)).min() > 0.9999
    assert _correlations(reference, mirrored.project(poses)).mean() < 0.6


def test_transform_map_convention() -> None:
    """A 90° rotation about z sends +x to +y: with arrays indexed [z, y, x] that is a rot90 in the (y, x) plane."""
    rng = np.random.default_rng(6)
    volume = rng.standard_normal((9, 9, 9)).astype(np.float32)
    quarter_turn = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    expected = np.rot90(volume, k=1, axes=(2, 1))
    np.testing.assert_allclose(transform_map(volume, quarter_turn, order=1), expected, atol=1e-5)
    # W(x) = V(x − t): content moves by +2 along x and −1 along z.
    shifted = transform_map(volume, np.eye(3), (2.0, 0.0, -1.0), order=1)
    np.testing.assert_allclose(shifted[:-1, :, 2:], volume[1:, :, :-2], atol=1e-6)
    # Mirror through the plane z = 0 (index D // 2 = 4 of 9): index i goes to 8 − i.
    np.testing.assert_allclose(transform_map(volume, np.eye(3), flip=True, order=1), volume[::-1], atol=1e-6)


@pytest.mark.parametrize(("box", "flip", "seed"), [(64, False, 7), (63, True, 8)])
def test_align_map_recovers_a_rotated_shifted_map_and_its_hand(
    hand_volume: np.ndarray, box: int, flip: bool, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    reference = np.ascontiguousarray(hand_volume[:box, :box, :box])
    rotation = uniform_random_rotations(1, rng)[0]
    shift = rng.uniform(-3.0, 3.0, 3)
    moved = transform_map(reference, rotation, shift, flip=flip)
    alignment = align_map(moved, reference)
    assert alignment.flipped == flip
    # The exact inverse transform is the best any alignment can do (each resampling blurs the finest detail).
    if not flip:
        ideal = transform_map(moved, rotation.T, -rotation.T @ shift)
        assert rotation_angle_deg(alignment.rotation, rotation.T) < 0.2
        np.testing.assert_allclose(alignment.shift_px, -rotation.T @ shift, atol=0.05)
    else:
        ideal = transform_map(moved, MIRROR @ rotation.T @ MIRROR, -MIRROR @ rotation.T @ shift, flip=True)
    best = fsc_curve(ideal, reference)
    got = fsc_curve(alignment.aligned_map, reference)
    within = slice(1, int(0.75 * (box // 2)) + 1)
    assert np.all(got[within] > best[within] - 0.01)
    assert np.all(got[within] > 0.9)


def test_compare_to_reference_reports_resolution_and_hand(hand_volume: np.ndarray) -> None:
    rng = np.random.default_rng(9)
    reference = hand_volume
    moved = transform_map(reference, uniform_random_rotations(1, rng)[0], (1.5, -2.0, 0.5), flip=True)
    comparison = compare_to_reference(moved, reference, pixel_size_a=2.0)
    assert comparison.alignment.flipped
    assert comparison.fsc.shape == (33,)
    assert comparison.resolution_a < 2.0 * 2.0 * 1.25  # within 25% of Nyquist (4 Å)
    # Without the hand check the mirrored map cannot be aligned well.
    one_hand = compare_to_reference(moved, reference, pixel_size_a=2.0, allow_flip=False)
    assert not one_hand.alignment.flipped
    assert one_hand.resolution_a > 2.0 * comparison.resolution_a


@pytest.fixture(scope="module")
def hand_volume(shared_data_dir: Path) -> np.ndarray:
    """cryoDRGN's asymmetric 64³ test map (a hand), whose mirror image is a different map."""
    with mrcfile.open(shared_data_dir / "maps" / "hand-vol.mrc", permissive=True) as handle:
        return np.asarray(handle.data, dtype=np.float32)


def _correlations(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(a.shape[0], -1)
    b = b.reshape(b.shape[0], -1)
    return np.abs(np.sum(np.conj(a) * b, axis=1)) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _small_rotation(rng: np.random.Generator, angle_deg: float) -> np.ndarray:
    from scipy.spatial.transform import Rotation  # noqa: PLC0415

    axis = rng.normal(size=3)
    return Rotation.from_rotvec(np.radians(angle_deg) * axis / np.linalg.norm(axis)).as_matrix()


def test_class_purity_is_the_majority_fraction_per_class_and_nan_when_empty():
    truth = np.array([0, 0, 0, 1, 1, 1, 1, 0])
    predicted = np.array([0, 0, 0, 0, 2, 2, 2, 2])  # class 1 empty
    purity = class_purity(predicted, truth, n_classes=3)
    assert purity[0] == pytest.approx(3 / 4)
    assert np.isnan(purity[1])
    assert purity[2] == pytest.approx(3 / 4)
    assert np.all(class_purity(truth, truth, n_classes=2) == 1.0)
