"""Reconstruction: noise-free recovery of a real map, CTF weighting, half maps with Wiener filtering, 2D averages."""

from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np
import pytest

from cryostack.core.backend import cupy_available
from cryostack.core.ctf import ctf_2d
from cryostack.core.fourier import fft3_centered, fourier_crop_3d, ifft3_centered
from cryostack.core.fsc import fsc_curve
from cryostack.core.geometry import rotation_matrix_2d, uniform_random_rotations
from cryostack.core.projection import Projector, Projector2D
from cryostack.core.reconstruction import (
    HalfMapReconstructor,
    Reconstructor,
    Reconstructor2D,
    reconstruct_from_sums,
    ssnr_from_fsc,
)


def _map_at_box(shared_data_dir: Path, box: int) -> tuple[np.ndarray, float]:
    """The 3J9G potential (64³, 4.4 Å/px) Fourier-cropped to ``box``, and its pixel size."""
    with mrcfile.open(shared_data_dir / "maps" / "3j9g_potential_ps4_4.mrc") as mrc:
        volume = mrc.data.astype(np.float32)
        pixel_a = float(mrc.voxel_size.x)
    cropped = ifft3_centered(fourier_crop_3d(fft3_centered(volume), box)).real.astype(np.float32)
    return cropped, pixel_a * volume.shape[0] / box


@pytest.mark.parametrize(("box", "count"), [(32, 2000), (33, 1500)])
def test_noise_free_reconstruction_reaches_fsc_090_to_08_nyquist(shared_data_dir: Path, box: int, count: int) -> None:
    truth, _ = _map_at_box(shared_data_dir, box)
    rotations = uniform_random_rotations(count, np.random.default_rng(box))
    reconstructor = Reconstructor(box)
    reconstructor.insert(Projector(truth).project(rotations), rotations)
    estimate = reconstructor.reconstruct()
    assert estimate.shape == (box, box, box) and estimate.dtype == np.float32
    fsc = fsc_curve(estimate, truth)
    assert fsc[: int(0.8 * (box // 2)) + 1].min() >= 0.9
    # Per-shell amplitude is right too (not only the correlation), away from the origin's first shells.
    truth_ft, estimate_ft = fft3_centered(truth), fft3_centered(estimate)
    shell = np.rint(np.sqrt(sum(g**2 for g in np.meshgrid(*[np.arange(box) - box // 2] * 3, indexing="ij"))))
    for s in (4, 8, 12):
        inside = shell == s
        gain = np.vdot(truth_ft[inside], estimate_ft[inside]).real / np.vdot(truth_ft[inside], truth_ft[inside]).real
        assert gain == pytest.approx(1.0, abs=0.02)


def test_map_mean_matches_the_data(shared_data_dir: Path) -> None:
    box = 32
    truth, _ = _map_at_box(shared_data_dir, box)
    rotations = uniform_random_rotations(1500, np.random.default_rng(13))
    slices = Projector(truth).project(rotations)
    data_mean = float(slices[:, box // 2, box // 2].real.mean())  # the DC every image carries
    oversampled = Reconstructor(box)
    oversampled.insert(slices, rotations)
    assert float(oversampled.reconstruct().sum()) == pytest.approx(data_mean, rel=0.05)
    # Without the half-shell resampling near the origin the mean is badly biased: the test can fail.
    plain = Reconstructor(box, oversampled_shells=0)
    plain.insert(slices, rotations)
    assert float(plain.reconstruct().sum()) < 0.85 * data_mean


def test_ctf_weighted_reconstruction_undoes_the_ctf(shared_data_dir: Path) -> None:
    box = 32
    truth, pixel_a = _map_at_box(shared_data_dir, box)
    rng = np.random.default_rng(7)
    rotations = uniform_random_rotations(1500, rng)
    defocus = rng.uniform(10000, 30000, size=1500)
    ctf = ctf_2d(box, pixel_a, defocus, defocus, 0.0, 300.0, 2.7, 0.1)  # (N, D, D)
    images = Projector(truth).project(rotations) * ctf
    with_ctf = Reconstructor(box)
    with_ctf.insert(images, rotations, ctf=ctf)
    ignoring_ctf = Reconstructor(box)
    ignoring_ctf.insert(images, rotations)
    good = fsc_curve(with_ctf.reconstruct(), truth)
    bad = fsc_curve(ignoring_ctf.reconstruct(), truth)
    assert good[: int(0.8 * (box // 2)) + 1].min() >= 0.9
    assert bad[1:].mean() < good[1:].mean() - 0.1


def test_half_maps_wiener_filter_improves_on_the_plain_map(shared_data_dir: Path) -> None:
    box = 32
    truth, _ = _map_at_box(shared_data_dir, box)
    rng = np.random.default_rng(8)
    count = 1200
    rotations = uniform_random_rotations(count, rng)
    clean = Projector(truth).project(rotations)
    # White noise with a per-coefficient variance of σ² = D²·s²; SNR about 0.05 in real space.
    noise_sd = 3.0 * float(np.std(np.fft.ifft2(clean[:50]).real)) * box
    noisy = clean + noise_sd / np.sqrt(2) * (rng.standard_normal(clean.shape) + 1j * rng.standard_normal(clean.shape))
    half_set = np.where(np.arange(count) % 2 == 0, 1, 2)
    reconstructor = HalfMapReconstructor(box)
    reconstructor.insert(noisy.astype(np.complex64), rotations, half_set, weights=np.full(count, 1 / noise_sd**2))
    result = reconstructor.reconstruct()
    assert result.fsc[0] == pytest.approx(1.0) and result.fsc[1] > 0.9 and result.fsc[-1] < 0.5
    plain = Reconstructor(box)
    plain.insert(noisy.astype(np.complex64), rotations)
    plain_map = plain.reconstruct()

    def error(m: np.ndarray) -> float:
        return float(np.linalg.norm(m - truth) / np.linalg.norm(truth))

    assert error(result.merged) < 0.8 * error(plain_map)
    assert error(result.half_a) < error(plain_map) and error(result.half_b) < error(plain_map)


@pytest.mark.parametrize(("fsc_value", "tau2_fudge", "gain"), [(0.5, 1.0, 0.5), (0.5, 4.0, 0.8), (0.8, 2.0, 8 / 9)])
def test_wiener_gain_follows_the_formula(fsc_value: float, tau2_fudge: float, gain: float) -> None:
    # Uniform weight w: V = w·X / (w + w / (T·SSNR)) = X · T·SSNR / (T·SSNR + 1) in every shell.
    box, padded = 16, 32
    rng = np.random.default_rng(12)
    truth_ft = fft3_centered(rng.standard_normal((padded, padded, padded))).astype(np.complex64)
    weight = np.full((padded,) * 3, 7.0, np.float32)
    data = truth_ft * weight
    plain = reconstruct_from_sums(data, weight, box, 3, regularisation_relative=0.0)
    wiener = reconstruct_from_sums(data, weight, box, 3, fsc=np.full(box // 2 + 1, fsc_value), tau2_fudge=tau2_fudge)
    np.testing.assert_allclose(wiener, gain * plain, atol=1e-5 * np.abs(plain).max())


def test_ssnr_from_fsc() -> None:
    np.testing.assert_allclose(ssnr_from_fsc(np.array([0.5, 0.0, 1.0])), [1.0, 0.001 / 0.999, 0.999 / 0.001])


@pytest.mark.parametrize("box", [24, 25])
def test_2d_class_averages_from_rotated_images(box: int) -> None:
    rng = np.random.default_rng(9)
    c = np.arange(box) - box // 2
    yy, xx = np.meshgrid(c, c, indexing="ij")
    classes = np.stack([
        np.exp(-((xx - 4) ** 2 + (yy + 2) ** 2) / 8.0) + 0.5 * np.exp(-((xx + 3) ** 2 + (yy - 5) ** 2) / 4.0),
        np.exp(-((xx + 5) ** 2 + yy**2) / 6.0) - 0.3 * np.exp(-(xx**2 + (yy - 6) ** 2) / 5.0),
    ]).astype(np.float32)
    count = 400
    labels = rng.integers(0, 2, count)
    rotations = rotation_matrix_2d(rng.uniform(0, 360, count))
    # Images are the classes seen at in-plane rotations A: I(k) = C(Aᵀ k); inserting at A undoes it.
    rotated = Projector2D(classes).rotate(rotations)  # (K, N, D, D)
    images = rotated[labels, np.arange(count)]
    reconstructor = Reconstructor2D(2, box)
    reconstructor.insert(images, rotations, labels)
    averages = reconstructor.reconstruct()
    assert averages.shape == (2, box, box)
    for k in range(2):
        assert np.corrcoef(averages[k].ravel(), classes[k].ravel())[0, 1] > 0.99
        data_mean = images[labels == k, box // 2, box // 2].real.mean()
        assert float(averages[k].sum()) == pytest.approx(float(data_mean), rel=0.02)
    frc = np.ones(box // 2 + 1)
    np.testing.assert_allclose(reconstructor.reconstruct(frc=frc), averages, atol=0.02 * np.abs(averages).max())


@pytest.mark.gpu
def test_cupy_matches_numpy() -> None:
    if not cupy_available():
        pytest.skip("CuPy with a CUDA device is not available")
    import cupy  # noqa: PLC0415

    rng = np.random.default_rng(11)
    box = 21
    truth = rng.standard_normal((box, box, box)).astype(np.float32)
    rotations = uniform_random_rotations(300, rng)
    images = Projector(truth).project(rotations)
    half_set = 1 + np.arange(300) % 2
    host = HalfMapReconstructor(box)
    host.insert(images, rotations, half_set)
    device = HalfMapReconstructor(box, xp=cupy)
    device.insert(cupy.asarray(images), cupy.asarray(rotations), cupy.asarray(half_set))
    expected, result = host.reconstruct(), device.reconstruct()
    np.testing.assert_allclose(cupy.asnumpy(result.fsc), expected.fsc, atol=1e-4)
    np.testing.assert_allclose(cupy.asnumpy(result.merged), expected.merged, atol=1e-4 * np.abs(expected.merged).max())
