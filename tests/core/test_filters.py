"""Fourier filters: band limits, complementarity, Butterworth shape, B-factor against an analytic Gaussian."""

from __future__ import annotations

import numpy as np
import pytest

from cryostack.core.filters import (
    apply_bfactor,
    butterworth_highpass_response,
    highpass,
    lowpass,
    lowpass_response,
)
from cryostack.core.fourier import fft2_centered, frequency_radius_px


@pytest.mark.parametrize("box", [32, 33])
def test_lowpass_band_limit_and_highpass_complement(box: int) -> None:
    rng = np.random.default_rng(box)
    images = rng.standard_normal((3, box, box)).astype(np.float32)
    low = lowpass(images, 2.0, 8.0, ndim=2, edge_width_shells=2.0)
    high = highpass(images, 2.0, 8.0, ndim=2, edge_width_shells=2.0)
    np.testing.assert_allclose(low + high, images, atol=1e-5)
    radius = frequency_radius_px(box, 2)
    cutoff = box * 2.0 / 8.0
    ft_low, ft = fft2_centered(low), fft2_centered(images)
    assert np.abs(ft_low[:, radius >= cutoff + 1]).max() < 1e-3
    np.testing.assert_allclose(ft_low[:, radius <= cutoff - 1], ft[:, radius <= cutoff - 1], atol=1e-3)
    response = lowpass_response(box, 2.0, 8.0, 2)
    assert response[box // 2, box // 2] == 1.0


def test_butterworth_highpass_is_half_at_the_cutoff_and_steep() -> None:
    response = butterworth_highpass_response(64, 1.0, 8.0, order=8, ndim=3)
    c = 32
    assert response[c, c, c] == 0.0
    assert response[c, c, c + 8] == pytest.approx(0.5)  # shell 64/8 = 8
    assert response[c, c, c + 6] < 0.02 and response[c, c, c + 11] > 0.99


def test_bfactor_blurs_a_gaussian_as_predicted() -> None:
    box, pixel_a, sigma_a, bfactor = 64, 1.0, 2.0, 200.0
    c = (np.arange(box) - box // 2) * pixel_a
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    blob = np.exp(-(x**2 + y**2 + z**2) / (2 * sigma_a**2)).astype(np.float32)
    blurred = apply_bfactor(blob, pixel_a, bfactor)
    # exp(-B f²/4) is the transform of a Gaussian of variance B / (8π²) per axis.
    widened = sigma_a**2 + bfactor / (8 * np.pi**2)
    expected = (sigma_a**2 / widened) ** 1.5 * np.exp(-(x**2 + y**2 + z**2) / (2 * widened))
    np.testing.assert_allclose(blurred, expected, atol=1e-4)
    # A negative B undoes a positive one (kept small: exp(+B f²/4) amplifies float32 rounding at Nyquist).
    mild = apply_bfactor(blob, pixel_a, 20.0)
    np.testing.assert_allclose(apply_bfactor(mild, pixel_a, -20.0), blob, atol=1e-4)
