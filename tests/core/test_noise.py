"""Noise power σ²(ν) from the background and from residuals, on noise of known spectrum."""

from __future__ import annotations

import numpy as np
import pytest

from cryostack.core.fourier import fft2_centered, frequency_radius_px, ifft2_centered, radial_average
from cryostack.core.noise import noise_power_from_background, noise_power_from_residuals
from cryostack.errors import InvalidArgumentError

COUNT = 400  # images: each shell estimate then has a few % scatter


def _particles(rng: np.random.Generator, box: int) -> np.ndarray:
    """A bright disc (the 'particle') inside radius 0.3·D that the background estimate must ignore."""
    c = np.arange(box) - box // 2
    return (np.hypot(*np.meshgrid(c, c, indexing="ij")) < 0.3 * box).astype(np.float32) * 50.0


@pytest.mark.parametrize("box", [32, 33])
def test_white_noise_power_from_background(box: int) -> None:
    rng = np.random.default_rng(box)
    sd = 0.7
    images = _particles(rng, box) + rng.normal(0, sd, (COUNT, box, box)).astype(np.float32) + 3.0
    power = noise_power_from_background(images, particle_radius_px=0.35 * box)
    assert power.shape == (box // 2 + 1,)
    ratio = power / (box * box * sd * sd)  # white noise: σ² = D²·s² in every shell
    assert np.abs(ratio - 1).max() < 0.15
    assert abs(ratio[2:].mean() - 1) < 0.03


@pytest.mark.parametrize("box", [32, 33])
def test_coloured_noise_power_from_background(box: int) -> None:
    rng = np.random.default_rng(10 + box)
    sd = 1.3
    white = rng.normal(0, sd, (COUNT, box, box)).astype(np.float32)
    gain = 1.0 / (1.0 + (frequency_radius_px(box, 2) / (0.15 * box)) ** 2)  # known filter H
    coloured = ifft2_centered(fft2_centered(white) * gain).real + _particles(rng, box)
    power = noise_power_from_background(coloured, particle_radius_px=0.35 * box)
    expected = radial_average(gain.astype(np.float64) ** 2, 2) * box * box * sd * sd
    ratio = power / expected
    assert np.abs(ratio[1:] - 1).max() < 0.15
    assert expected[-1] < 0.1 * expected[1]  # the spectrum really is coloured (a 10x fall)


def test_noise_power_from_residuals() -> None:
    rng = np.random.default_rng(5)
    box, sd = 24, 2.0
    signal = rng.standard_normal((COUNT, box, box)).astype(np.float32)
    images = signal + rng.normal(0, sd, signal.shape).astype(np.float32)
    power = noise_power_from_residuals(fft2_centered(images), fft2_centered(signal))
    assert np.abs(power / (box * box * sd * sd) - 1).max() < 0.1
    with pytest.raises(InvalidArgumentError):
        noise_power_from_residuals(fft2_centered(images), fft2_centered(signal[:3]))


def test_particle_filling_the_box_is_rejected() -> None:
    with pytest.raises(InvalidArgumentError):
        noise_power_from_background(np.zeros((2, 8, 8), np.float32), particle_radius_px=20.0)
