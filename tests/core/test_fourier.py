"""Fourier conventions: centring, scaling (Parseval), frequency grids, shells, shift sign, cropping."""

from __future__ import annotations

import numpy as np
import pytest

from cryostack.core.fourier import (
    centered_coefficients_2d,
    centered_frequency_indices,
    coefficient_frequencies,
    coefficient_indices,
    fft2_centered,
    fft3_centered,
    fourier_crop_2d,
    frequency_grid_2d,
    ifft2_centered,
    ifft3_centered,
    n_shells,
    nyquist_frequency_inv_a,
    nyquist_resolution_a,
    phase_ramp_2d,
    phase_shift_2d,
    radial_average,
    radial_frequency_index,
    resolution_mask,
    resolution_to_shell,
    shell_to_resolution_a,
)
from cryostack.errors import InvalidArgumentError

F32_RTOL = 1e-5


@pytest.mark.parametrize("box", [16, 17])
def test_delta_at_origin_pixel_has_flat_real_transform(box: int) -> None:
    image = np.zeros((box, box), np.float32)
    image[box // 2, box // 2] = 1.0
    np.testing.assert_allclose(fft2_centered(image), np.ones((box, box)), atol=1e-6)


@pytest.mark.parametrize("box", [16, 17])
def test_dc_sits_at_centre_and_equals_the_sum(box: int) -> None:
    rng = np.random.default_rng(0)
    volume = rng.standard_normal((box, box, box)).astype(np.float32)
    ft = fft3_centered(volume)
    assert ft.dtype == np.complex64
    assert ft[box // 2, box // 2, box // 2].real == pytest.approx(float(volume.sum(dtype=np.float64)), rel=1e-4)


@pytest.mark.parametrize("box", [16, 17])
def test_round_trip_and_parseval_2d_3d(box: int) -> None:
    rng = np.random.default_rng(1)
    images = rng.standard_normal((3, box, box)).astype(np.float32)
    ft = fft2_centered(images)
    np.testing.assert_allclose(ifft2_centered(ft).real, images, atol=1e-5)
    energy = np.sum(np.abs(ft.astype(np.complex128)) ** 2, axis=(1, 2))
    np.testing.assert_allclose(energy, box**2 * np.sum(images.astype(np.float64) ** 2, axis=(1, 2)), rtol=F32_RTOL)
    volume = rng.standard_normal((box, box, box))
    vft = fft3_centered(volume)
    assert vft.dtype == np.complex128
    np.testing.assert_allclose(ifft3_centered(vft).real, volume, atol=1e-12)
    assert np.sum(np.abs(vft) ** 2) == pytest.approx(box**3 * np.sum(volume**2), rel=1e-12)


@pytest.mark.parametrize("box", [16, 17])
def test_frequency_grid_and_nyquist(box: int) -> None:
    fy, fx = frequency_grid_2d(box, 2.0)
    assert fy.shape == fx.shape == (box, box)
    assert fx[0, box // 2] == 0 and fy[box // 2, 0] == 0
    assert fx[0, box // 2 + 1] == pytest.approx(1 / (box * 2.0))
    assert fy[box // 2 + 1, 0] == pytest.approx(1 / (box * 2.0))
    assert np.all(np.diff(fx[0]) > 0) and np.all(np.diff(fy[:, 0]) > 0)
    assert nyquist_frequency_inv_a(2.0) == 0.25 and nyquist_resolution_a(2.0) == 4.0
    assert centered_frequency_indices(box)[0] == -(box // 2)
    assert n_shells(box) == box // 2 + 1


def test_shells_and_resolution_mask() -> None:
    shells = radial_frequency_index(16, 2)
    assert shells[8, 8] == 0 and shells[8, 11] == 3 and shells[11, 12] == 5  # |(3, 4)| = 5
    assert radial_frequency_index(17, 3)[8, 8, 8] == 0
    mask = resolution_mask(32, 2.0, 8.0)  # 1/8 Å⁻¹ is shell 32·2/8 = 8
    assert resolution_to_shell(32, 2.0, 8.0) == 8
    assert shell_to_resolution_a(32, 2.0, 8) == 8.0
    assert mask[16, 24] and not mask[16, 25] and mask[16 + 8, 16]


def test_radial_average_of_a_radial_function() -> None:
    shells = radial_frequency_index(21, 2).astype(np.float64)
    values = np.stack([shells**2, 3 * shells])
    averaged = radial_average(values, 2)
    np.testing.assert_allclose(averaged[0], np.arange(11) ** 2)
    np.testing.assert_allclose(averaged[1], 3 * np.arange(11))


@pytest.mark.parametrize("box", [16, 17])
def test_integer_shift_moves_content_towards_positive_x_and_y(box: int) -> None:
    rng = np.random.default_rng(2)
    image = rng.standard_normal((box, box)).astype(np.float32)
    shifted = ifft2_centered(phase_shift_2d(fft2_centered(image), np.array([3.0, -2.0]))).real
    np.testing.assert_allclose(shifted, np.roll(image, (-2, 3), axis=(0, 1)), atol=1e-5)


def test_phase_ramp_on_a_coefficient_subset_matches_the_full_grid() -> None:
    box = 16
    shifts = np.array([[1.5, -0.25], [0.0, 2.0]])
    full = phase_ramp_2d(shifts, box)  # (2, D, D)
    mask = np.zeros((box, box), bool)
    mask[3:9, 5:12] = True
    index = coefficient_indices(box, mask)
    ky, kx = coefficient_frequencies(box, index)
    np.testing.assert_allclose(phase_ramp_2d(shifts, box, ky=ky, kx=kx), full.reshape(2, -1)[:, index], atol=1e-6)
    np.testing.assert_array_equal(coefficient_indices(box, index), index)
    with pytest.raises(InvalidArgumentError):
        coefficient_indices(box, np.array([box * box]))


@pytest.mark.parametrize("box", [8, 9, 64, 65])
def test_centered_coefficients_match_the_full_centred_transform(box: int) -> None:
    rng = np.random.default_rng(box)
    images = rng.standard_normal((4, box, box)).astype(np.float32)
    # Coefficients from both half-planes, the axes, Nyquist and DC, in no particular order.
    index = rng.permutation(box * box)[: box * box // 3]
    index = np.concatenate([index, [box * box // 2 + box // 2, 0, box - 1]])
    expected = fft2_centered(images).reshape(4, -1)[:, index]
    values = centered_coefficients_2d(images, index)
    assert values.shape == (4, index.size) and values.dtype == np.complex64
    np.testing.assert_allclose(values, expected, atol=1e-5 * float(np.abs(expected).max()))
    with pytest.raises(InvalidArgumentError, match="images"):
        centered_coefficients_2d(images[:, :, :-1], index)
    with pytest.raises(InvalidArgumentError, match="images"):
        centered_coefficients_2d(images[0, 0], index)
    with pytest.raises(InvalidArgumentError, match="coefficients"):
        centered_coefficients_2d(images, np.array([box * box]))


def test_fourier_crop_keeps_the_origin_centred() -> None:
    ft = np.ones((3, 16, 16), np.complex64)  # transform of a delta at the origin pixel
    for new_box in (8, 9):
        image = ifft2_centered(fourier_crop_2d(ft, new_box)).real
        assert np.unravel_index(np.argmax(image[0]), image[0].shape) == (new_box // 2, new_box // 2)
