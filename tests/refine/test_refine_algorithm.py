"""Heterogeneous and homogeneous refinement against the ground truth of small simulated sets (box 32, 6 Å/px)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from cryostack.core.backend import cupy_available
from cryostack.core.filters import lowpass
from cryostack.core.fsc import fsc_curve, resolution_at_threshold
from cryostack.core.metrics import adjusted_rand_index, rotation_error
from cryostack.core.simulate import scenario
from cryostack.core.sources import ArrayParticles
from cryostack.errors import InvalidArgumentError
from cryostack.services.refine.common import PASS_BATCH
from cryostack.services.refine.hetero import HeterogeneousRefinement
from cryostack.services.refine.homo import HomogeneousRefinement
from cryostack.services.refine.parameters import HeteroParameters, HomoParameters

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "abinitio"))
from abinitio_data import SINGLE, simulate  # noqa: E402

PIXEL_A = 6.0


class CountingParticles(ArrayParticles):
    """In-memory particles that record how many images each read asked for."""

    def __init__(self, images: np.ndarray) -> None:
        super().__init__(images)
        self.read_sizes: list[int] = []

    def read(self, indices: np.ndarray) -> np.ndarray:
        self.read_sizes.append(int(np.size(indices)))
        return super().read(indices)

    def iter_batches(self, indices=None, batch_size=None):  # noqa: ANN001, ANN201
        for rows, images in super().iter_batches(indices, batch_size):
            self.read_sizes.append(int(rows.size))
            yield rows, images


@pytest.fixture(scope="module")
def three_states():
    return simulate(scenario("three-state"), 600, box_px=32, pixel_size_a=PIXEL_A, snr=1.0, seed=1)


@pytest.fixture(scope="module")
def single():
    return simulate(SINGLE, 600, box_px=32, pixel_size_a=PIXEL_A, snr=1.0, seed=2)


def _hetero(data, params: HeteroParameters, seed: int = 3, particles=None) -> HeterogeneousRefinement:
    starts = np.stack([lowpass(m, PIXEL_A, 30.0, ndim=3) for m in data.maps])
    return HeterogeneousRefinement(particles or ArrayParticles(data.images), data.ctf, starts, PIXEL_A, params, seed)


def _run(run):
    reports = []
    while not run.done:
        reports.append(run.step())
    return run.finish(), reports


def test_hetero_separates_three_states_and_each_class_map_matches_its_state(three_states) -> None:
    params = HeteroParameters(batch_size_per_class=100, random_assignment_iterations=2, final_full_iterations=2)
    result, reports = _run(_hetero(three_states, params))

    assert adjusted_rand_index(three_states.state, result.best_class) >= 0.7
    assert [r.phase for r in reports[:2]] == ["random", "random"] and reports[-1].phase == "full"
    assert result.iteration_count == len(reports)
    for k in range(3):
        members = result.best_class == k
        majority = np.bincount(three_states.state[members], minlength=3).argmax()
        correlation = [np.corrcoef(result.volumes[k].ravel(), truth.ravel())[0, 1] for truth in three_states.maps]
        assert int(np.argmax(correlation)) == majority
    assert np.all(np.isfinite(result.resolution_a)) and np.all(result.resolution_a < 30.0)
    np.testing.assert_allclose(result.class_posteriors.sum(axis=1), 1.0, atol=1e-5)
    assert set(np.unique(result.half_set)) == {0, 1}


def test_hetero_resumed_from_a_checkpoint_ends_equal_to_an_uninterrupted_run(three_states) -> None:
    params = HeteroParameters(batch_size_per_class=60, random_assignment_iterations=1, final_full_iterations=1,
                              max_online_iterations=3)
    uninterrupted, _ = _run(_hetero(three_states, params))
    first = _hetero(three_states, params)
    first.step()
    first.step()
    starts = np.stack([lowpass(m, PIXEL_A, 30.0, ndim=3) for m in three_states.maps])
    resumed = HeterogeneousRefinement(ArrayParticles(three_states.images), three_states.ctf, starts, PIXEL_A, params,
                                      3, state=first.state_bytes())
    result, _ = _run(resumed)

    np.testing.assert_array_equal(result.class_posteriors, uninterrupted.class_posteriors)
    np.testing.assert_array_equal(result.volumes, uninterrupted.volumes)


def test_hetero_streams_particles_in_bounded_batches_and_reads_each_once_per_full_pass(three_states) -> None:
    n = three_states.images.shape[0]
    particles = CountingParticles(three_states.images)
    params = HeteroParameters(batch_size_per_class=50, random_assignment_iterations=1, final_full_iterations=2,
                              max_online_iterations=2)
    run = _hetero(three_states, params, particles=particles)
    particles.read_sizes.clear()
    while not run.state.online_done:
        run.step()
    assert particles.read_sizes and max(particles.read_sizes) == 150  # one minibatch: 50 per class × 3
    particles.read_sizes.clear()
    run.step()  # a full pass
    assert sum(particles.read_sizes) == n and max(particles.read_sizes) <= PASS_BATCH


def test_homo_recovers_poses_and_its_gold_standard_fsc_agrees_with_the_truth(single) -> None:
    result, reports = _run(HomogeneousRefinement(ArrayParticles(single.images), single.ctf, single.maps[0], PIXEL_A,
                                                 HomoParameters(), seed=3))

    assert [r.phase for r in reports[:2]] == ["global", "global"] and reports[-1].phase == "local"
    error = rotation_error(result.rotations, single.rotations)
    assert error.median_deg <= 10.0
    truth_fsc = np.asarray(fsc_curve(result.map, single.maps[0]))
    truth_a = resolution_at_threshold(truth_fsc, 32, PIXEL_A, 0.5)
    assert truth_a <= 24.0
    # The corrected masked FSC may not claim more than the map shares with the truth.
    assert np.all(result.fsc_corrected[1:] <= truth_fsc[1:] + 0.1)
    assert result.resolution_a == pytest.approx(reports[-1].half_map_resolution_a[0])
    assert 0.0 <= result.mask.min() and result.mask.max() <= 1.0 and result.mask.max() == pytest.approx(1.0)
    assert result.iteration_count == len(reports) == result.resolution_history_a.size


def test_homo_half_maps_are_built_from_their_own_half_sets_particles(single) -> None:
    params = HomoParameters(max_iterations=3)
    first = HomogeneousRefinement(ArrayParticles(single.images), single.ctf, single.maps[0], PIXEL_A, params, seed=3)
    result, _ = _run(first)
    noisy = single.images.copy()
    other = first.half_set == 1
    noisy[other] = np.random.default_rng(0).standard_normal(noisy[other].shape).astype(np.float32)
    second, _ = _run(HomogeneousRefinement(ArrayParticles(noisy), single.ctf, single.maps[0], PIXEL_A, params, seed=3))

    # Only the noise model, the mask and the search resolution are shared between the halves, so half map A
    # barely moves while half map B, made from noise aligned to its reference now, resembles it far less.
    def correlation(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])

    assert correlation(second.half_maps[0], result.half_maps[0]) > 0.95
    assert correlation(second.half_maps[1], result.half_maps[1]) < 0.8


@pytest.mark.parametrize(("changes", "field"), [
    ({"batch_size_per_class": 0}, "batch_size_per_class"),
    ({"final_full_iterations": 0}, "final_full_iterations"),
    ({"convergence_class_change_fraction": 1.0}, "convergence_class_change_fraction"),
    ({"initial_resolution_a": 5.0}, "initial_resolution_a"),
])
def test_hetero_parameters_out_of_range_name_their_field(changes: dict, field: str) -> None:
    with pytest.raises(InvalidArgumentError) as raised:
        HeteroParameters(**changes).check(100, PIXEL_A, 3)
    assert raised.value.field == field


@pytest.mark.parametrize(("changes", "field"), [
    ({"mask_threshold_fraction": 0.0}, "mask_threshold_fraction"),
    ({"mask_dilation_a": -1.0}, "mask_dilation_a"),
    ({"max_iterations": 0}, "max_iterations"),
    ({"initial_lowpass_resolution_a": 10.0}, "initial_lowpass_resolution_a"),
])
def test_homo_parameters_out_of_range_name_their_field(changes: dict, field: str) -> None:
    with pytest.raises(InvalidArgumentError) as raised:
        HomoParameters(**changes).check(100, 6.0)
    assert raised.value.field == field


@pytest.mark.gpu
def test_refinements_on_the_gpu_match_the_same_runs_on_the_cpu(three_states, single) -> None:
    if not cupy_available():
        pytest.skip("CuPy with a CUDA device is not available")
    import cupy  # noqa: PLC0415

    params = HeteroParameters(batch_size_per_class=60, random_assignment_iterations=1, final_full_iterations=1,
                              max_online_iterations=3)
    starts = np.stack([lowpass(m, PIXEL_A, 30.0, ndim=3) for m in three_states.maps])
    runs = [HeterogeneousRefinement(ArrayParticles(three_states.images), three_states.ctf, starts, PIXEL_A, params, 3,
                                    xp=xp) for xp in (np, cupy)]
    host, device = (_run(run)[0] for run in runs)
    # The same minibatches in float32 arithmetic of another order: maps and assignments agree, not bits.
    assert isinstance(device.volumes, np.ndarray)
    for k in range(3):
        assert np.corrcoef(device.volumes[k].ravel(), host.volumes[k].ravel())[0, 1] >= 0.999
    assert np.mean(device.best_class == host.best_class) >= 0.97
    # A device run's checkpoint resumes on the host.
    HeterogeneousRefinement(ArrayParticles(three_states.images), three_states.ctf, starts, PIXEL_A, params, 3,
                            state=runs[1].state_bytes())

    homo = [HomogeneousRefinement(ArrayParticles(single.images), single.ctf, single.maps[0], PIXEL_A,
                                  HomoParameters(max_iterations=3), seed=3, xp=xp) for xp in (np, cupy)]
    host_homo, device_homo = (_run(run)[0] for run in homo)
    assert np.corrcoef(device_homo.map.ravel(), host_homo.map.ravel())[0, 1] >= 0.999
    assert rotation_error(device_homo.rotations, host_homo.rotations).median_deg <= 1.0
    assert abs(device_homo.resolution_a - host_homo.resolution_a) <= 0.05 * host_homo.resolution_a


def test_a_split_the_particles_carry_is_kept_and_a_bad_one_is_refused(single) -> None:
    n = single.images.shape[0]
    given = (np.arange(n) % 2).astype(np.int64)
    run = HomogeneousRefinement(ArrayParticles(single.images), single.ctf, single.maps[0], PIXEL_A,
                                HomoParameters(max_iterations=1), seed=3, half_set=given)
    np.testing.assert_array_equal(run.half_set, given)
    result, _ = _run(run)
    np.testing.assert_array_equal(result.half_set, given)
    drawn = HomogeneousRefinement(ArrayParticles(single.images), single.ctf, single.maps[0], PIXEL_A,
                                  HomoParameters(max_iterations=1), seed=3)
    assert not np.array_equal(drawn.half_set, given) and set(np.unique(drawn.half_set)) == {0, 1}
    with pytest.raises(InvalidArgumentError) as raised:
        HomogeneousRefinement(ArrayParticles(single.images), single.ctf, single.maps[0], PIXEL_A, HomoParameters(),
                              seed=3, half_set=given + 1)
    assert raised.value.field == "half_set"
