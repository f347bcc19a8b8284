"""Simulated particles: the forward model at the ground truth, the SNR, determinism and pose distributions."""

from __future__ import annotations

import numpy as np
import pytest

from cryostack.core.backend import cupy_available, to_host
from cryostack.core.ctf import ctf_2d
from cryostack.core.fourier import ifft2_centered, phase_shift_2d
from cryostack.core.geometry import euler_to_matrix, relion_origin_to_shift_px
from cryostack.core.phantom import BlobPhantom, MapPhantom
from cryostack.core.projection import Projector
from cryostack.core.simulate import (
    SCENARIOS,
    ParticleSimulator,
    PoseDistribution,
    SimulationParameters,
    _sample_von_mises_fisher,
    disc_mask,
    sample_view_directions,
    scenario,
)
from cryostack.errors import InvalidArgumentError

FLOAT32_ATOL = 1e-5


def expected_clean_image(simulator: ParticleSimulator, index: int, projectors: dict) -> np.ndarray:
    """One particle rendered independently from its ground truth: its own volume, pose, CTF and origin."""
    truth, params = simulator.ground_truth, simulator.params
    present = bool(truth.domain_present[index])
    hinge = float(truth.hinge_angle_deg[index]) if present else 0.0
    key = (present, hinge)
    if key not in projectors:
        projectors[key] = Projector(BlobPhantom(params.box_px).volume(hinge, domain_present=present))
    rotation = euler_to_matrix(truth.rot_deg[index], truth.tilt_deg[index], truth.psi_deg[index])[None]
    ctf = ctf_2d(
        params.box_px, params.pixel_size_a, truth.defocus_u_a[index], truth.defocus_v_a[index],
        truth.defocus_angle_deg[index], params.voltage_kv, params.cs_mm, params.amplitude_contrast,
    )
    shift = relion_origin_to_shift_px(np.array([truth.origin_x_a[index], truth.origin_y_a[index]]), params.pixel_size_a)
    return ifft2_centered(phase_shift_2d(projectors[key].project(rotation) * ctf, shift)).real[0]


@pytest.mark.parametrize(("name", "box_px"), [("floppy", 32), ("three-state", 33)])
def test_clean_images_are_ctf_times_projection_at_the_ground_truth(name: str, box_px: int) -> None:
    params = SimulationParameters(n_particles=48, box_px=box_px, pixel_size_a=4.0, seed=5, hinge_step_deg=10.0)
    simulator = ParticleSimulator(scenario(name), params, cache_bytes=1)  # a one-projector cache: rebuilds work
    clean = simulator.clean_images(0, 48)
    assert clean.shape == (48, box_px, box_px) and clean.dtype == np.float32
    projectors: dict = {}
    scale = np.abs(clean).max()
    for index in range(48):
        np.testing.assert_allclose(clean[index], expected_clean_image(simulator, index, projectors),
                                   atol=FLOAT32_ATOL * scale)
    # Protein is positive after a CTF that is positive at low frequency: the image sums to CTF(0) · mass > 0.
    assert np.all(clean.sum(axis=(1, 2)) > 0)


def test_noise_is_white_gaussian_at_the_requested_snr() -> None:
    params = SimulationParameters(n_particles=200, box_px=32, pixel_size_a=4.0, snr=0.5, seed=11)
    simulator = ParticleSimulator(scenario("hinge"), params)
    clean = simulator.clean_images(0, 200).astype(np.float64)
    noise = simulator.images(0, 200).astype(np.float64) - clean
    mask = disc_mask(32, simulator.particle_radius_px)
    signal_variance = np.mean(np.var(clean[:, mask], axis=1))
    # With N <= 512 the reference set is the whole dataset, so the SNR holds up to the noise's own sampling error.
    assert signal_variance / noise.var() == pytest.approx(0.5, rel=0.02)
    assert noise.std() == pytest.approx(simulator.noise_sigma, rel=0.01)
    assert abs(noise.mean()) < 0.01 * simulator.noise_sigma
    lag_correlation = np.mean(noise[:, :, 1:] * noise[:, :, :-1]) / noise.var()
    assert abs(lag_correlation) < 0.01
    kurtosis = np.mean(noise**4) / noise.var() ** 2
    assert kurtosis == pytest.approx(3.0, abs=0.05)


def test_same_seed_gives_identical_output_for_any_batch_size() -> None:
    params = SimulationParameters(n_particles=40, box_px=24, pixel_size_a=5.0, seed=7)
    first = ParticleSimulator(scenario("floppy"), params)
    second = ParticleSimulator(scenario("floppy"), params)
    for column, values in first.ground_truth.columns().items():
        np.testing.assert_array_equal(values, second.ground_truth.columns()[column], err_msg=column)
    whole = first.images(0, 40)
    batched = np.concatenate([batch.images for batch in second.batches(batch_size=16)])
    np.testing.assert_array_equal(whole, batched)
    other = ParticleSimulator(scenario("floppy"), SimulationParameters(n_particles=40, box_px=24, pixel_size_a=5.0,
                                                                      seed=8))
    assert not np.allclose(other.ground_truth.rot_deg, first.ground_truth.rot_deg)
    assert not np.allclose(other.images(0, 40), whole)


def test_von_mises_fisher_draws_have_the_theoretical_mean_cosine() -> None:
    rng = np.random.default_rng(0)
    mean_direction = np.array([0.6, 0.0, 0.8])
    for kappa in (5.0, 50.0):
        draws = _sample_von_mises_fisher(np.tile(mean_direction, (40_000, 1)), kappa, rng)
        np.testing.assert_allclose(np.linalg.norm(draws, axis=1), 1.0, atol=1e-12)
        # On S², E[cos θ] = coth κ − 1/κ; the spread around the mean is isotropic (no preferred azimuth).
        cosine = draws @ mean_direction
        assert cosine.mean() == pytest.approx(1 / np.tanh(kappa) - 1 / kappa, abs=3e-3)
        np.testing.assert_allclose((draws - np.outer(cosine, mean_direction)).mean(axis=0), 0.0, atol=3e-3)


def test_uniform_poses_are_uniform_on_so3() -> None:
    params = SimulationParameters(n_particles=30_000, seed=2)
    rotations = ParticleSimulator(scenario("three-state"), params).ground_truth.rotations(slice(None))
    # Haar measure: every matrix entry has mean 0 and mean square 1/3.
    np.testing.assert_allclose(rotations.mean(axis=0), 0.0, atol=0.015)
    np.testing.assert_allclose((rotations**2).mean(axis=0), 1 / 3, atol=0.01)


def angle_to_nearest_view_deg(directions: np.ndarray, views: tuple[tuple[float, float], ...]) -> np.ndarray:
    """Angle (degrees) from each direction (N, 3) to the nearest of the given (rot, tilt) views."""
    rot, tilt = np.deg2rad(np.asarray(views)).T
    axes = np.stack([np.cos(rot) * np.sin(tilt), np.sin(rot) * np.sin(tilt), np.cos(tilt)], axis=-1)
    return np.rad2deg(np.arccos(np.clip((directions @ axes.T).max(axis=1), -1, 1)))


def test_preferred_orientation_is_concentrated_around_its_views() -> None:
    floppy = SCENARIOS["floppy"]
    params = SimulationParameters(n_particles=20_000, seed=4)
    preferred = ParticleSimulator(floppy, params).ground_truth.view_directions()
    uniform = ParticleSimulator(scenario("hinge"), params).ground_truth.view_directions()
    views = floppy.poses.preferred_views
    near_preferred = np.mean(angle_to_nearest_view_deg(preferred, views) < 25.0)
    near_uniform = np.mean(angle_to_nearest_view_deg(uniform, views) < 25.0)
    cap = 3 * (1 - np.cos(np.deg2rad(25.0))) / 2  # three disjoint caps of 25° cover this fraction of the sphere
    assert near_uniform == pytest.approx(cap, abs=0.015)
    kappa, spread = floppy.poses.kappa, 1 - np.cos(np.deg2rad(25.0))
    expected = (1 - floppy.poses.uniform_fraction) * (1 - np.exp(-kappa * spread)) + floppy.poses.uniform_fraction * cap
    assert near_preferred == pytest.approx(expected, abs=0.02)
    assert near_preferred > 4 * near_uniform


def test_ground_truth_follows_the_scenario() -> None:
    params = SimulationParameters(n_particles=6000, seed=9, pixel_size_a=3.0, shift_sigma_px=2.0)
    truth = ParticleSimulator(scenario("floppy"), params).ground_truth
    absent = ~truth.domain_present
    assert absent.mean() == pytest.approx(0.3, abs=0.02)
    np.testing.assert_array_equal(truth.state, absent.astype(int))
    assert np.all(np.isnan(truth.hinge_angle_deg[absent]))
    hinge = truth.hinge_angle_deg[~absent]
    assert hinge.min() == 0.0 and hinge.max() == 60.0
    np.testing.assert_allclose(hinge / 2.0, np.round(hinge / 2.0), atol=1e-9)
    assert hinge.mean() == pytest.approx(30.0, abs=1.0)
    mean_defocus = (truth.defocus_u_a + truth.defocus_v_a) / 2
    assert mean_defocus.min() >= 10_000 and mean_defocus.max() <= 25_000
    astigmatism = truth.defocus_u_a - truth.defocus_v_a
    assert astigmatism.min() >= 0 and astigmatism.max() <= 400
    assert np.std(truth.origin_x_a) == pytest.approx(6.0, rel=0.05)
    assert np.std(truth.origin_y_a) == pytest.approx(6.0, rel=0.05)
    counts = np.bincount(ParticleSimulator(scenario("three-state"), params).ground_truth.state)
    np.testing.assert_allclose(counts / counts.sum(), 1 / 3, atol=0.03)


def test_ground_truth_maps_cover_each_state_and_the_particle_weighted_mean() -> None:
    params = SimulationParameters(n_particles=300, box_px=24, seed=1, hinge_step_deg=15.0)
    simulator = ParticleSimulator(scenario("floppy"), params)
    maps = simulator.ground_truth_maps()
    assert set(maps) == {
        "state0_domain_present_hinge000", "state0_domain_present_hinge030", "state0_domain_present_hinge060",
        "state1_domain_absent", "mean",
    }
    phantom = BlobPhantom(24)
    np.testing.assert_allclose(maps["state0_domain_present_hinge030"], phantom.volume(30.0), atol=1e-6)
    np.testing.assert_allclose(maps["state1_domain_absent"], phantom.volume(0.0, domain_present=False), atol=1e-6)
    truth = simulator.ground_truth
    expected = np.mean(
        [phantom.volume(h, domain_present=p) if p else phantom.core_volume()
         for h, p in zip(np.nan_to_num(truth.hinge_angle_deg), truth.domain_present, strict=True)],
        axis=0,
    )
    np.testing.assert_allclose(maps["mean"], expected, atol=1e-5)


def test_an_input_map_drives_the_simulation() -> None:
    base = BlobPhantom(24).volume(0.0)
    source = MapPhantom(base)
    params = SimulationParameters(n_particles=10, box_px=24, seed=3)
    simulator = ParticleSimulator(scenario("three-state"), params, source=source)
    assert np.isfinite(simulator.images(0, 10)).all()
    with pytest.raises(InvalidArgumentError, match="box_px"):
        ParticleSimulator(scenario("hinge"), SimulationParameters(n_particles=10, box_px=32), source=source)


def test_invalid_parameters_are_rejected_with_their_field() -> None:
    with pytest.raises(InvalidArgumentError, match="snr"):
        SimulationParameters(n_particles=10, snr=0.0)
    with pytest.raises(InvalidArgumentError, match="defocus_min_a"):
        SimulationParameters(n_particles=10, defocus_min_a=30_000.0)
    with pytest.raises(InvalidArgumentError, match="scenario"):
        scenario("wobbly")
    with pytest.raises(InvalidArgumentError, match="batch_size"):
        next(ParticleSimulator(scenario("hinge"), SimulationParameters(n_particles=2, box_px=16)).batches(0))


def test_uniform_pose_distribution_ignores_views() -> None:
    rot, tilt = sample_view_directions(PoseDistribution(), 5, np.random.default_rng(0))
    assert rot.shape == tilt.shape == (5,)
    assert np.all((tilt >= 0) & (tilt <= 180))


@pytest.mark.gpu
def test_gpu_images_match_cpu() -> None:
    if not cupy_available():
        pytest.skip("CuPy with a CUDA device is not available")
    import cupy  # noqa: PLC0415

    params = SimulationParameters(n_particles=32, box_px=32, seed=6, hinge_step_deg=10.0)
    cpu = ParticleSimulator(scenario("floppy"), params).images(0, 32)
    gpu = ParticleSimulator(scenario("floppy"), params, xp=cupy).images(0, 32)
    np.testing.assert_allclose(to_host(gpu), cpu, atol=1e-4 * np.abs(cpu).max())
