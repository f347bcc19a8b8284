"""The batched scoring kernel against a direct evaluation of the Gaussian log-likelihood, on synthetic data with
known answers, under chunking, and on GPU when present."""

from __future__ import annotations

import numpy as np
import pytest

from cryostack.core.backend import cupy_available, to_host
from cryostack.core.fourier import fft2_centered, resolution_mask
from cryostack.core.scoring import (
    iter_log_likelihoods,
    iter_posteriors,
    local_log_likelihoods,
    log_likelihoods,
    prepare_templates,
    score_force_max,
    score_top_k,
    scoring_flops,
    shift_phase_ramps,
)
from cryostack.errors import InvalidArgumentError

EPS32 = float(np.finfo(np.float32).eps)


def _complex(rng: np.random.Generator, shape: tuple[int, ...], scale: float = 1.0) -> np.ndarray:
    return (scale * (rng.standard_normal(shape) + 1j * rng.standard_normal(shape))).astype(np.complex64)


def _problem(rng: np.random.Generator, n: int = 7, m: int = 11, c: int = 23, s: int = 5) -> dict[str, np.ndarray]:
    """Random particles, templates, CTFs, per-coefficient noise variances and phase ramps of random shifts."""
    box = 16
    flat = rng.choice(box * box, size=c, replace=False)
    return {
        "particles": _complex(rng, (n, c)),
        "templates": _complex(rng, (m, c), 0.7),
        "ctf": rng.uniform(-1.0, 1.0, (n, c)).astype(np.float32),
        "noise_var": rng.uniform(0.5, 2.0, c).astype(np.float32),
        "shift_ramps": shift_phase_ramps(rng.uniform(-3.0, 3.0, (s, 2)), box, flat),
    }


def _direct(problem: dict[str, np.ndarray]) -> np.ndarray:
    """−Σ_c |X·P − CTF·T|² / 2σ² for every (particle, shift, template), by explicit loops in float64."""
    x = problem["particles"].astype(np.complex128)
    t = problem["templates"].astype(np.complex128)
    ctf = problem["ctf"].astype(np.float64) if problem.get("ctf") is not None else np.ones(x.shape)
    var = problem["noise_var"].astype(np.float64) if problem.get("noise_var") is not None else np.ones(x.shape[1])
    ramps = problem["shift_ramps"] if problem.get("shift_ramps") is not None else np.ones((1, x.shape[1]))
    out = np.empty((x.shape[0], ramps.shape[0], t.shape[0]))
    for n in range(x.shape[0]):
        for s in range(ramps.shape[0]):
            for m in range(t.shape[0]):
                residual = x[n] * ramps[s] - ctf[n] * t[m]
                out[n, s, m] = -np.sum(np.abs(residual) ** 2 / (2.0 * var))
    return out


def _tolerance(problem: dict[str, np.ndarray]) -> float:
    """Float32 rounding of sums of C terms of the largest term's size."""
    x = problem["particles"]
    var = problem["noise_var"] if problem.get("noise_var") is not None else np.ones(x.shape[1])
    templates = problem["templates"]
    scale = np.max(np.sum(np.abs(x) ** 2 / var, axis=1)) + np.max(np.sum(np.abs(templates) ** 2 / var, axis=1))
    return 20 * EPS32 * float(scale)


def _probability_tolerance(problem: dict[str, np.ndarray], temperature: float) -> float:
    """A log-score error δ moves a probability p by about p·δ ≤ δ."""
    return max(1e-5, _tolerance(problem) / temperature)


def _softmax(scores: np.ndarray) -> np.ndarray:
    flat = scores.reshape(scores.shape[0], -1)
    weights = np.exp(flat - flat.max(axis=1, keepdims=True))
    return (weights / weights.sum(axis=1, keepdims=True)).reshape(scores.shape)


@pytest.mark.parametrize("with_shifts", [False, True])
@pytest.mark.parametrize("with_ctf_and_noise", [False, True])
def test_log_likelihoods_equal_the_direct_formula(with_shifts: bool, with_ctf_and_noise: bool) -> None:
    problem = _problem(np.random.default_rng(1))
    if not with_shifts:
        problem["shift_ramps"] = None
    if not with_ctf_and_noise:
        problem["ctf"] = problem["noise_var"] = None
    expected = _direct(problem)
    got = log_likelihoods(**problem)
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=_tolerance(problem))


@pytest.mark.parametrize("max_bytes", [1 << 30, 3000, 1])
@pytest.mark.parametrize("with_shifts", [False, True])
@pytest.mark.parametrize("with_ctf_and_noise", [False, True])
def test_local_log_likelihoods_pick_each_particles_own_templates(
    max_bytes: int, with_shifts: bool, with_ctf_and_noise: bool
) -> None:
    """Each particle's own templates (repeats allowed, different per particle) score as in the direct formula."""
    rng = np.random.default_rng(4)
    problem = _problem(rng)
    if not with_shifts:
        problem["shift_ramps"] = None
    if not with_ctf_and_noise:
        problem["ctf"] = problem["noise_var"] = None
    index = rng.integers(0, problem["templates"].shape[0], size=(problem["particles"].shape[0], 4))
    index[0] = index[0, 0]
    expected = np.take_along_axis(_direct(problem), index[:, None, :], axis=2)  # (N, S, m)
    got = local_log_likelihoods(**problem, template_index=index, max_bytes=max_bytes)
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=_tolerance(problem))


@pytest.mark.parametrize(
    ("index", "message"),
    [
        (np.zeros((7, 0), dtype=np.int64), "m >= 1"),
        (np.zeros((6, 2), dtype=np.int64), r"\(7, m\)"),
        (np.zeros((7, 2), dtype=np.float32), "integers"),
        (np.full((7, 2), 11), r"\[0, 11\)"),
        (np.full((7, 2), -1), r"\[0, 11\)"),
    ],
)
def test_local_log_likelihoods_name_a_bad_template_index(index: np.ndarray, message: str) -> None:
    problem = _problem(np.random.default_rng(5))
    with pytest.raises(InvalidArgumentError, match=message) as caught:
        local_log_likelihoods(**problem, template_index=index)
    assert caught.value.field == "template_index"


@pytest.mark.parametrize("max_bytes", [1 << 30, 4000, 1])
@pytest.mark.parametrize("signal", [1.0, 12.0])
def test_force_max_equals_the_direct_argmax(max_bytes: int, signal: float) -> None:
    """At signal 12 the posteriors are peaked, so sums over shifts skip templates that carry no mass."""
    problem = _problem(np.random.default_rng(2))
    problem["particles"] *= signal
    problem["templates"] *= signal
    ll = _direct(problem)
    flat = ll.reshape(ll.shape[0], -1)
    best = flat.argmax(axis=1)
    result = score_force_max(**problem, temperature=2.0, max_bytes=max_bytes)
    n_templates = problem["templates"].shape[0]
    np.testing.assert_array_equal(result.shift, best // n_templates)
    np.testing.assert_array_equal(result.template, best % n_templates)
    np.testing.assert_allclose(result.log_likelihood, flat.max(axis=1), atol=_tolerance(problem))
    posterior = _softmax(ll / 2.0)
    np.testing.assert_allclose(
        result.max_probability,
        posterior.reshape(ll.shape[0], -1).max(axis=1),
        atol=_probability_tolerance(problem, 2.0),
    )
    per_template = ll.max(axis=1)  # (N, M): best shift per template
    runner_up = np.sort(per_template, axis=1)[:, -2]
    np.testing.assert_allclose(result.margin, (flat.max(axis=1) - runner_up) / 2.0, atol=_tolerance(problem))
    scaled = flat / 2.0
    evidence = np.log(np.exp(scaled - scaled.max(axis=1, keepdims=True)).sum(axis=1)) + scaled.max(axis=1)
    np.testing.assert_allclose(result.log_evidence, evidence, atol=_tolerance(problem))


@pytest.mark.parametrize("max_bytes", [1 << 30, 4000, 1])
@pytest.mark.parametrize("signal", [0.3, 12.0])
def test_top_k_and_posteriors_equal_the_direct_softmax(max_bytes: int, signal: float) -> None:
    """Weak signal spreads the posteriors over many pairs; strong signal concentrates them on a few."""
    rng = np.random.default_rng(3)
    problem = _problem(rng)
    problem["particles"] *= signal
    problem["templates"] *= signal
    log_prior = np.log(rng.dirichlet(np.ones(problem["templates"].shape[0]))).astype(np.float32)
    shift_log_prior = -0.5 * np.arange(problem["shift_ramps"].shape[0], dtype=np.float32)
    ll = _direct(problem)
    temperature = 1.5
    posterior = _softmax(ll / temperature + log_prior[None, None, :] + shift_log_prior[None, :, None])
    kwargs = dict(temperature=temperature, log_prior=log_prior, shift_log_prior=shift_log_prior, max_bytes=max_bytes)

    dense = np.full(ll.shape, np.nan, dtype=np.float32)
    for block in iter_posteriors(**problem, **kwargs):
        assert np.all(np.isnan(dense[block.particles, :, block.templates])), "blocks never overlap"
        dense[block.particles, :, block.templates] = block.values
    probability_tolerance = _probability_tolerance(problem, temperature)
    np.testing.assert_allclose(dense, posterior, atol=probability_tolerance)
    np.testing.assert_allclose(dense.sum(axis=(1, 2)), 1.0, atol=1e-5)

    k = 6
    top = score_top_k(**problem, k=k, **kwargs)
    flat = posterior.reshape(ll.shape[0], -1)
    order = np.argsort(-flat, axis=1)[:, :k]
    n_templates = problem["templates"].shape[0]
    np.testing.assert_array_equal(top.template, order % n_templates)
    np.testing.assert_array_equal(top.shift, order // n_templates)
    kept = np.take_along_axis(flat, order, axis=1)
    np.testing.assert_allclose(top.captured, kept.sum(axis=1), atol=probability_tolerance)
    np.testing.assert_allclose(top.weight, kept / kept.sum(axis=1, keepdims=True), atol=probability_tolerance)
    np.testing.assert_allclose(top.weight.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(
        top.log_likelihood, np.take_along_axis(ll.reshape(ll.shape[0], -1), order, axis=1), atol=_tolerance(problem)
    )
    assert np.all(np.diff(top.weight, axis=1) <= 0), "best first"


def test_chunking_gives_the_same_results() -> None:
    rng = np.random.default_rng(4)
    problem = _problem(rng, n=300, m=600, c=31, s=3)  # a small budget splits both particles and templates
    whole = score_force_max(**problem)
    chunked = score_force_max(**problem, max_bytes=60_000)
    np.testing.assert_array_equal(chunked.template, whole.template)
    np.testing.assert_array_equal(chunked.shift, whole.shift)
    for name in ("log_likelihood", "margin", "max_probability", "log_evidence"):
        np.testing.assert_allclose(getattr(chunked, name), getattr(whole, name), atol=_tolerance(problem))
    blocks = list(iter_log_likelihoods(**problem, max_bytes=60_000))
    assert len({b.particles.start for b in blocks}) > 1 and len({b.templates.start for b in blocks}) > 1
    full = log_likelihoods(**problem)
    covered = np.zeros(full.shape, dtype=int)
    for block in blocks:
        np.testing.assert_allclose(block.values, full[block.particles, :, block.templates], atol=_tolerance(problem))
        covered[block.particles, :, block.templates] += 1
    assert np.all(covered == 1)
    top_whole = score_top_k(**problem, k=5)
    top_chunked = score_top_k(**problem, k=5, max_bytes=60_000)
    np.testing.assert_array_equal(top_chunked.template, top_whole.template)
    np.testing.assert_allclose(top_chunked.weight, top_whole.weight, atol=1e-5)


def test_top_k_over_many_templates_matches_a_full_sort() -> None:
    """Long rows take the chunked selection path; ties and a short last chunk must not change the answer."""
    problem = _problem(np.random.default_rng(10), n=20, m=1001, c=16, s=2)
    problem["templates"][500] = problem["templates"][499]  # an exact tie
    k = 4
    ll = log_likelihoods(**problem).reshape(20, -1)  # (N, S·M), validated against the direct formula above
    top = score_top_k(**problem, k=k)
    expected = np.sort(ll, axis=1)[:, ::-1][:, :k]
    got = ll[np.arange(20)[:, None], top.shift * 1001 + top.template]
    np.testing.assert_array_equal(got, expected)
    assert all(len(set(zip(t, s, strict=True))) == k for t, s in zip(top.template, top.shift, strict=True))


def test_prepared_templates_give_the_same_scores() -> None:
    problem = _problem(np.random.default_rng(5))
    prepared = prepare_templates(problem["templates"])
    assert (prepared.n_templates, prepared.n_coefficients) == problem["templates"].shape
    direct = log_likelihoods(**problem)
    problem["templates"] = prepared
    np.testing.assert_array_equal(log_likelihoods(**problem), direct)


@pytest.mark.parametrize("box", [32, 33])
def test_phase_ramps_undo_the_particle_shift(box: int) -> None:
    rng = np.random.default_rng(6)
    image = rng.standard_normal((box, box)).astype(np.float32)
    shift = (3, -2)  # (sx, sy): the particle is the template moved by +3 px along x, -2 px along y
    particle = np.roll(image, shift=(shift[1], shift[0]), axis=(0, 1))
    mask = resolution_mask(box, 1.0, 2.5)
    ramps = shift_phase_ramps(np.array([shift, (0, 0)], dtype=np.float64), box, mask)
    assert ramps.shape == (2, int(mask.sum())) and ramps.dtype == np.complex64
    template_ft = fft2_centered(image)[mask]
    particle_ft = fft2_centered(particle)[mask]
    scale = np.abs(template_ft).max()
    np.testing.assert_allclose(particle_ft * ramps[0], template_ft, atol=1e-4 * scale)
    np.testing.assert_allclose(particle_ft * ramps[1], particle_ft, atol=1e-6 * scale)


def test_true_template_and_shift_are_recovered_from_noisy_particles() -> None:
    """Particles = CTF × (a class image shifted by a grid shift) + white noise; the kernel finds class and shift."""
    rng = np.random.default_rng(7)
    box, n_classes, n_particles = 32, 6, 120
    yy, xx = np.mgrid[:box, :box] - box // 2
    classes = np.stack(
        [
            sum(np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 2.5**2)) for cx, cy in rng.uniform(-7, 7, (4, 2)))
            for _ in range(n_classes)
        ]
    ).astype(np.float32)  # (K, D, D)
    shifts = np.array([(dx, dy) for dx in (-2, 0, 2) for dy in (-2, 0, 2)], dtype=np.float64)  # (S, 2)
    true_class = rng.integers(0, n_classes, n_particles)
    true_shift = rng.integers(0, shifts.shape[0], n_particles)
    frequency = np.hypot(xx, yy) / box
    ctfs = np.stack([np.sin(np.pi * 20.0 * d * frequency**2 + 0.35) for d in rng.uniform(1.0, 2.5, n_particles)])
    noise_sigma = 0.4
    images = np.stack(
        [
            np.roll(classes[c], shift=(int(shifts[s, 1]), int(shifts[s, 0])), axis=(0, 1))
            for c, s in zip(true_class, true_shift, strict=True)
        ]
    )
    particles_ft = ctfs * fft2_centered(images) + fft2_centered(noise_sigma * rng.standard_normal(images.shape))
    mask = resolution_mask(box, 1.0, 3.0)
    result = score_force_max(
        particles_ft[:, mask],
        fft2_centered(classes)[:, mask],
        ctf=ctfs[:, mask].astype(np.float32),
        # White noise of variance σ² per pixel has variance D²σ² per coefficient of the unnormalised FFT.
        noise_var=np.full(int(mask.sum()), box * box * noise_sigma**2, dtype=np.float32),
        shift_ramps=shift_phase_ramps(shifts, box, mask),
    )
    np.testing.assert_array_equal(result.template, true_class)
    # A class image can look almost the same under two grid shifts; at this noise level such a tie may go either
    # way, but then the kernel must say it is unsure.
    confident = result.max_probability > 0.9
    assert np.mean(confident) > 0.95
    np.testing.assert_array_equal(result.shift[confident], true_shift[confident])
    assert np.mean(result.shift == true_shift) >= 0.98
    assert np.all(result.margin > 0)


def test_scoring_flops_count_both_gemms() -> None:
    assert scoring_flops(10, 20, 30, 4) == 2 * 40 * 60 * 20 + 2 * 10 * 30 * 20


def test_bad_inputs_raise() -> None:
    problem = _problem(np.random.default_rng(8))
    cases = {
        "templates": {**problem, "templates": problem["templates"][:, :5]},
        "ctf": {**problem, "ctf": problem["ctf"][:3]},
        "noise_var": {**problem, "noise_var": -problem["noise_var"]},
        "shift_ramps": {**problem, "shift_ramps": problem["shift_ramps"][:, :4]},
    }
    for field, kwargs in cases.items():
        with pytest.raises(InvalidArgumentError) as error:
            score_force_max(**kwargs)
        assert error.value.field == field
    with pytest.raises(InvalidArgumentError) as error:
        score_force_max(**problem, temperature=0.0)
    assert error.value.field == "temperature"
    with pytest.raises(InvalidArgumentError):
        score_top_k(**problem, k=0)


@pytest.mark.gpu
def test_cupy_matches_numpy() -> None:
    if not cupy_available():
        pytest.skip("CuPy with a CUDA device is not available")
    import cupy  # noqa: PLC0415

    problem = _problem(np.random.default_rng(9), n=50, m=30, c=40, s=4)
    device = {name: None if value is None else cupy.asarray(value) for name, value in problem.items()}
    tolerance = _tolerance(problem)
    np.testing.assert_allclose(to_host(log_likelihoods(**device)), log_likelihoods(**problem), atol=tolerance)
    index = np.random.default_rng(10).integers(0, 30, size=(50, 6))
    np.testing.assert_allclose(
        to_host(local_log_likelihoods(**device, template_index=cupy.asarray(index), max_bytes=20_000)),
        local_log_likelihoods(**problem, template_index=index),
        atol=tolerance,
    )
    host_max, device_max = score_force_max(**problem), score_force_max(**device, max_bytes=20_000)
    np.testing.assert_array_equal(to_host(device_max.template), host_max.template)
    np.testing.assert_array_equal(to_host(device_max.shift), host_max.shift)
    np.testing.assert_allclose(to_host(device_max.max_probability), host_max.max_probability, atol=1e-5)
    host_top, device_top = score_top_k(**problem, k=4), score_top_k(**device, k=4, max_bytes=20_000)
    np.testing.assert_array_equal(to_host(device_top.template), host_top.template)
    np.testing.assert_allclose(to_host(device_top.weight), host_top.weight, atol=1e-5)
    total = np.zeros(50)
    for block in iter_posteriors(**device, temperature=2.0, max_bytes=20_000):
        total[block.particles] += to_host(block.values.sum(axis=(1, 2)))
    np.testing.assert_allclose(total, 1.0, atol=1e-5)
