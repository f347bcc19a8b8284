"""The ab-initio algorithm against ground truth: convergence to the true map up to hand (clean, and noisy with
CTF), separation of two states, the grey scale of its maps, exact resumption, and its building blocks."""

from __future__ import annotations

import numpy as np
import pytest

from cryostack.core.backend import cupy_available, to_host
from cryostack.core.fsc import fsc_curve
from cryostack.core.metrics import adjusted_rand_index, compare_to_reference, rotation_error, transform_map
from cryostack.errors import InvalidArgumentError
from cryostack.core.spectra import SpectralLayout, collect_spectra
from cryostack.services.abinitio.algorithm import AbinitioRun
from cryostack.services.abinitio.constraints import constrain, real_space_masks
from cryostack.services.abinitio.parameters import AbinitioParameters
from cryostack.services.abinitio.state import AbinitioState

from abinitio_data import SINGLE, TWO_STATES, simulate

# Box 32 at 6 Å/px (192 Å wide, Nyquist 12 Å); short runs sized for CI.
SHORT = {"initial_iterations": 20, "final_iterations": 10, "minibatch_size_initial": 60, "minibatch_size_final": 120}


def _run(data, params: AbinitioParameters, seed: int = 1):
    run = AbinitioRun(data.spectra(params), params, seed)
    while not run.done:
        run.step()
    return run, run.finish()


def test_clean_projections_converge_to_the_true_map_up_to_hand() -> None:
    data = simulate(SINGLE, 400, snr=1000.0, seed=0)
    params = AbinitioParameters(max_resolution_a=20.0, **SHORT)

    _, result = _run(data, params)

    comparison = compare_to_reference(result.volumes[0], data.maps[0], data.pixel_size_a)
    # The bar: FSC against the truth stays above 0.5 to 22 Å (the run marches to 20 Å), for one of the hands.
    assert comparison.resolution_a <= 22.0, comparison.resolution_a
    assert comparison.alignment.correlation >= 0.95
    # Grey scale: within the band the run resolved, the map's amplitude matches the truth's (Wiener-filtered,
    # so at most a little low): least-squares scale of the aligned, 30 Å low-passed map onto the truth.
    aligned = _lowpass(comparison.alignment.aligned_map, data.pixel_size_a, 30.0)
    truth = _lowpass(data.maps[0], data.pixel_size_a, 30.0)
    scale = float(np.vdot(aligned, truth) / np.vdot(aligned, aligned))
    assert 0.8 <= scale <= 1.3, scale
    # The reported poses are those of the map: the truth's up to one global rotation (and the same hand).
    errors = rotation_error(result.rotations, data.rotations, allow_flip=True)
    assert errors.flipped == comparison.alignment.flipped
    assert errors.median_deg <= 12.0, errors.median_deg  # the run reached 20 Å on a 57 Å-radius particle


def test_noisy_particles_with_ctf_converge_to_the_true_map_up_to_hand() -> None:
    data = simulate(SINGLE, 600, snr=0.2, seed=2)
    params = AbinitioParameters(max_resolution_a=24.0, **SHORT)

    _, result = _run(data, params)

    comparison = compare_to_reference(result.volumes[0], data.maps[0], data.pixel_size_a)
    assert comparison.resolution_a <= 32.0, comparison.resolution_a
    assert comparison.alignment.correlation >= 0.9
    assert result.class_sizes.tolist() == [600]


def test_two_classes_separate_two_different_states() -> None:
    data = simulate(TWO_STATES, 800, snr=1.0, seed=4)
    # Each class sees only its share of a minibatch, so K = 2 gets larger minibatches for the same epochs, and
    # enough iterations that the states separate from any seed (at 24 + 12 some seeds left them mixed).
    params = AbinitioParameters(class_count=2, max_resolution_a=24.0, initial_iterations=36, final_iterations=18,
                                minibatch_size_initial=120, minibatch_size_final=300)

    _, result = _run(data, params)

    assert adjusted_rand_index(data.state, result.best_class) >= 0.8
    # Each class map matches the state its particles come from better than the other state.
    correlation = np.array([
        [compare_to_reference(volume, truth, data.pixel_size_a).alignment.correlation for truth in data.maps]
        for volume in result.volumes
    ])  # (class, state)
    majority = [np.bincount(data.state[result.best_class == k], minlength=2).argmax() for k in range(2)]
    assert sorted(majority) == [0, 1]
    for k, state in enumerate(majority):
        assert correlation[k, state] > correlation[k, 1 - state]


def test_a_run_resumed_from_its_state_ends_equal_to_an_uninterrupted_run() -> None:
    data = simulate(TWO_STATES, 160, snr=0.5, seed=4)
    params = AbinitioParameters(class_count=2, max_resolution_a=24.0, initial_iterations=3, final_iterations=2,
                                minibatch_size_initial=40, minibatch_size_final=60)
    spectra = data.spectra(params)
    reference = AbinitioRun(spectra, params, seed=9)
    while not reference.done:
        reference.step()
    expected = reference.finish()

    interrupted = AbinitioRun(spectra, params, seed=9)
    for _ in range(2):
        interrupted.step()
    saved = interrupted.state.to_bytes()
    resumed = AbinitioRun(spectra, params, seed=9, state=AbinitioState.from_bytes(saved))
    assert resumed.state.iteration == 2
    while not resumed.done:
        resumed.step()
    result = resumed.finish()

    np.testing.assert_array_equal(resumed.state.data, reference.state.data)
    np.testing.assert_array_equal(result.volumes, expected.volumes)
    np.testing.assert_array_equal(result.class_posteriors, expected.class_posteriors)
    np.testing.assert_array_equal(result.rotations, expected.rotations)
    np.testing.assert_array_equal(result.shift_px, expected.shift_px)


def test_a_particles_final_posteriors_and_pose_do_not_depend_on_its_batch() -> None:
    """Each particle is scored against its own candidate rotations, whichever particles share its chunk."""
    data = simulate(TWO_STATES, 160, snr=0.5, seed=4)
    params = AbinitioParameters(class_count=2, max_resolution_a=24.0, initial_iterations=3, final_iterations=2,
                                minibatch_size_initial=40, minibatch_size_final=60)
    run = AbinitioRun(data.spectra(params), params, seed=9)
    while not run.done:
        run.step()

    whole = run.finish(chunk_size=160)
    split = run.finish(chunk_size=37)

    np.testing.assert_allclose(split.class_posteriors, whole.class_posteriors, atol=1e-5)
    np.testing.assert_allclose(split.rotations, whole.rotations, atol=1e-12)
    np.testing.assert_array_equal(split.shift_px, whole.shift_px)
    np.testing.assert_allclose(split.volumes, whole.volumes, atol=1e-4 * float(np.abs(whole.volumes).max()))


@pytest.mark.gpu
def test_a_run_on_the_gpu_matches_the_same_run_on_the_cpu() -> None:
    if not cupy_available():
        pytest.skip("CuPy with a CUDA device is not available")
    import cupy  # noqa: PLC0415

    data = simulate(TWO_STATES, 300, snr=0.5, seed=3)
    params = AbinitioParameters(class_count=2, max_resolution_a=20.0, initial_iterations=8, final_iterations=4,
                                minibatch_size_initial=60, minibatch_size_final=100)
    layout = SpectralLayout.for_resolution(32, data.pixel_size_a, params.max_resolution_a)
    rows = np.arange(300)
    host_spectra = collect_spectra([(rows, data.images)], 300, data.ctf, layout)
    device_spectra = collect_spectra([(rows, data.images)], 300, data.ctf, layout, cupy)
    assert isinstance(device_spectra.coefficients, cupy.ndarray)
    np.testing.assert_allclose(to_host(device_spectra.coefficients), host_spectra.coefficients, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(device_spectra.power, host_spectra.power, rtol=1e-5)

    host_run, device_run = AbinitioRun(host_spectra, params, seed=4), AbinitioRun(device_spectra, params, seed=4)
    while not host_run.done:
        host_report, device_report = host_run.step(), device_run.step()
        np.testing.assert_allclose(device_report.class_fractions, host_report.class_fractions, atol=0.02)
    host, device = host_run.finish(), device_run.finish()

    # The same minibatches and searches in float32 arithmetic of another order: the same answer within rounding
    # (a pose that nearly ties may flip, so the comparison is of maps and assignments, not bits).
    assert isinstance(device.volumes, np.ndarray) and isinstance(device.class_posteriors, np.ndarray)
    for k in range(2):
        assert np.corrcoef(device.volumes[k].ravel(), host.volumes[k].ravel())[0, 1] >= 0.999
    assert np.mean(device.best_class == host.best_class) >= 0.98
    assert rotation_error(device.rotations, host.rotations).median_deg <= 1.0
    # A checkpoint of the device run is host data that resumes on either backend.
    state = AbinitioState.from_bytes(device_run.state.to_bytes())
    assert isinstance(state.data, np.ndarray)
    resumed = AbinitioRun(device_spectra, params, seed=4, state=state)
    assert isinstance(resumed.state.data, cupy.ndarray)


@pytest.mark.parametrize(("box_px", "max_resolution_a"), [(31, 24.0), (31, 12.4), (32, 12.0)])
def test_a_short_run_works_on_odd_and_even_boxes_up_to_nyquist(box_px: int, max_resolution_a: float) -> None:
    data = simulate(SINGLE, 60, box_px=box_px, snr=1.0, seed=6)
    params = AbinitioParameters(max_resolution_a=max_resolution_a, initial_iterations=1, final_iterations=1,
                                minibatch_size_initial=30, minibatch_size_final=30)

    run, result = _run(data, params)

    assert result.volumes.shape == (1, box_px, box_px, box_px) and np.all(np.isfinite(result.volumes))
    assert run.working_box <= box_px
    assert result.rotations.shape == (60, 3, 3) and np.all(np.isfinite(result.shift_px))


def test_different_seeds_give_different_initial_volumes_and_equal_seeds_equal_ones() -> None:
    data = simulate(SINGLE, 120, snr=0.5, seed=5)
    params = AbinitioParameters(class_count=2, max_resolution_a=24.0, initial_iterations=1, final_iterations=0)
    spectra = data.spectra(params)
    first, again, other = (AbinitioRun(spectra, params, seed).state for seed in (1, 1, 2))
    np.testing.assert_array_equal(first.data, again.data)
    assert not np.array_equal(first.data, other.data)
    assert not np.array_equal(first.data[0], first.data[1])  # the classes start apart


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"class_count": 0}, "class_count"),
        ({"minibatch_size_initial": 0}, "minibatch_size_initial"),
        ({"minibatch_size_final": 10}, "minibatch_size_final"),
        ({"initial_resolution_a": 10.0}, "initial_resolution_a"),
        ({"learning_rate_initial": 0.0}, "learning_rate_initial"),
        ({"class_similarity_initial": 1.5}, "class_similarity_initial"),
        ({"class_similarity_final": 0.2}, "class_similarity_final"),
        ({"initial_iterations": 0, "final_iterations": 0}, "final_iterations"),
    ],
)
def test_out_of_range_parameters_name_their_field(changes: dict, field: str) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        AbinitioParameters(**changes).check()
    assert caught.value.field == field


def test_parameters_that_do_not_fit_the_set_name_their_field() -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        AbinitioParameters(max_resolution_a=8.0, initial_resolution_a=35.0).check(n_particles=100, pixel_size_a=6.0)
    assert caught.value.field == "max_resolution_a" and "Nyquist" in caught.value.reason
    with pytest.raises(InvalidArgumentError) as caught:
        AbinitioParameters(class_count=6).check(n_particles=5, pixel_size_a=1.0)
    assert caught.value.field == "class_count"
    AbinitioParameters(max_resolution_a=12.0).check(n_particles=100, pixel_size_a=6.0)  # Nyquist itself is allowed


@pytest.mark.parametrize("box_px", [31, 32, 64])
def test_layout_keeps_one_half_plane_sorted_by_frequency_inside_the_limit(box_px: int) -> None:
    layout = SpectralLayout.for_resolution(box_px, 3.0, 12.0)
    limit = min(box_px * 3.0 / 12.0 + 2.0, box_px // 2)
    assert np.all(np.diff(layout.radius) >= 0) and layout.radius.max() <= limit + 1e-9
    # Exactly one of each Friedel pair (k, -k), never the origin.
    pairs = set(zip(layout.ky.tolist(), layout.kx.tolist(), strict=True))
    assert (0, 0) not in pairs
    assert all((-y, -x) not in pairs for y, x in pairs)
    k = np.arange(box_px) - box_px // 2
    ky, kx = np.meshgrid(k, k, indexing="ij")
    inside = (np.hypot(ky, kx) <= limit + 1e-9) & ((ky != 0) | (kx != 0))
    assert 2 * layout.n_coefficients == int(inside.sum())
    # Every resolution is a prefix; coefficients fit the working box.
    count = layout.count_within(20.0)
    assert np.all(layout.radius[:count] <= box_px * 3.0 / 20.0 + 1e-9)
    assert np.all(layout.radius[count:] > box_px * 3.0 / 20.0)
    half = layout.working_box_px // 2
    assert np.abs(layout.ky).max() < half and np.abs(layout.kx).max() < half


def test_real_space_constraints_give_a_non_negative_centred_map() -> None:
    box = 24
    k = np.arange(box) - box // 2
    z, y, x = np.meshgrid(k, k, k, indexing="ij")
    blob = np.exp(-((x - 3.0) ** 2 + (y + 2.0) ** 2 + z**2) / 8.0)
    volume = (blob - blob.mean()).astype(np.float32)  # a transform without its DC term: zero mean, negative solvent
    window, solvent = real_space_masks(box)

    constrained = constrain(volume, window, solvent)

    assert constrained.min() >= -1e-3 * constrained.max()
    mass = np.clip(constrained, 0, None)
    centre = [(mass * axis).sum() / mass.sum() for axis in (x, y, z)]
    np.testing.assert_allclose(centre, 0.0, atol=0.3)
    # The shape is kept: it is the blob moved to the centre.
    moved = transform_map(blob.astype(np.float32), np.eye(3), np.array([-3.0, 2.0, 0.0]))
    assert float(fsc_curve(constrained, moved)[1:6].min()) > 0.99


def _lowpass(volume: np.ndarray, pixel_size_a: float, resolution_a: float) -> np.ndarray:
    box = volume.shape[0]
    k = np.fft.fftfreq(box)
    radius = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2) / pixel_size_a
    return np.fft.ifftn(np.fft.fftn(volume) * (radius <= 1.0 / resolution_a)).real
