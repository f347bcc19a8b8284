"""FSC/FRC invariants and the resolution read off a curve."""

from __future__ import annotations

import numpy as np
import pytest

from cryostack.core.filters import lowpass
from cryostack.core.fourier import fft3_centered
from cryostack.core.fsc import (
    fsc_curve,
    frc_curves,
    mask_corrected_fsc,
    phase_randomised,
    resolution_at_threshold,
    shell_frequencies_inv_a,
)
from cryostack.core.masks import soft_spherical_mask
from cryostack.errors import InvalidArgumentError


@pytest.mark.parametrize("box", [16, 17])
def test_fsc_of_a_map_with_itself_and_a_scaled_copy_is_one(box: int) -> None:
    rng = np.random.default_rng(box)
    volume = rng.standard_normal((box, box, box)).astype(np.float32)
    curve = fsc_curve(volume, volume)
    assert curve.shape == (box // 2 + 1,)
    np.testing.assert_allclose(curve, 1.0, atol=1e-6)
    np.testing.assert_allclose(fsc_curve(volume, 3.0 * volume), 1.0, atol=1e-6)
    image = volume[0]
    np.testing.assert_allclose(fsc_curve(image, image), 1.0, atol=1e-6)
    np.testing.assert_allclose(fsc_curve(image, -image)[1:], -1.0, atol=1e-6)


def test_fsc_of_independent_noise_is_near_zero() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((2, 32, 32, 32))
    curve = fsc_curve(a, b)
    # Shell s holds ~4πs² coefficients; the FSC of unrelated maps has a standard deviation of about 1/√count.
    assert np.abs(curve[4:]).max() < 5 / np.sqrt(4 * np.pi * 16)


def test_fsc_drops_beyond_a_lowpass() -> None:
    rng = np.random.default_rng(2)
    volume = rng.standard_normal((32, 32, 32)).astype(np.float32)
    filtered = lowpass(volume, 2.0, 8.0) + 0.01 * rng.standard_normal((32, 32, 32)).astype(np.float32)
    curve = fsc_curve(volume, filtered)
    cutoff_shell = 32 * 2.0 / 8.0  # 8 shells
    assert curve[: int(cutoff_shell) - 1].min() > 0.99
    assert np.abs(curve[int(cutoff_shell) + 2 :]).max() < 0.2
    # The map keeps (a fraction of) its signal through the cosine edge, which ends one shell past the cut-off.
    resolution = resolution_at_threshold(curve, 32, 2.0, 0.5)
    assert 64.0 / (cutoff_shell + 1.5) <= resolution <= 8.0


def test_frc_curves_per_pair_match_fsc_curve() -> None:
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((2, 4, 20, 20)).astype(np.float32)
    curves = frc_curves(a, b + a)
    assert curves.shape == (4, 11)
    for i in range(4):
        np.testing.assert_allclose(curves[i], fsc_curve(a[i], b[i] + a[i]), atol=1e-12)


def test_resolution_interpolates_the_crossing() -> None:
    box, pixel_a = 20, 2.0
    frequencies = shell_frequencies_inv_a(box, pixel_a)
    np.testing.assert_allclose(frequencies, np.arange(11) / 40.0)
    curve = np.array([1.0, 0.95, 0.9, 0.8, 0.6, 0.4, 0.2, 0.1, 0.05, 0.0, 0.0])
    # 0.5 is crossed halfway between shell 4 (0.6) and shell 5 (0.4): frequency 4.5/40.
    assert resolution_at_threshold(curve, box, pixel_a, 0.5) == pytest.approx(40 / 4.5)
    # 0.143 between shell 6 (0.2) and 7 (0.1): fraction 0.57.
    assert resolution_at_threshold(curve, box, pixel_a) == pytest.approx(40 / 6.57)
    assert resolution_at_threshold(np.ones(11), box, pixel_a) == pytest.approx(4.0)  # never crosses: Nyquist
    with pytest.raises(InvalidArgumentError):
        resolution_at_threshold(np.ones(5), box, pixel_a)


def test_phase_randomised_map_keeps_its_amplitudes_and_low_shells_but_not_its_high_phases() -> None:
    rng = np.random.default_rng(5)
    volume = lowpass(rng.standard_normal((32, 32, 32)).astype(np.float32), 1.0, 2.5)
    randomised = phase_randomised(volume, 6, np.random.default_rng(0))
    curve = fsc_curve(volume, randomised)
    np.testing.assert_allclose(curve[:6], 1.0, atol=1e-5)
    assert np.abs(curve[8:13]).max() < 0.15
    power = [np.abs(fft3_centered(v)) for v in (volume, randomised)]
    np.testing.assert_allclose(power[1], power[0], rtol=1e-3, atol=1e-3 * float(power[0].max()))


def test_mask_corrected_fsc_equals_the_masked_fsc_until_the_unmasked_fsc_falls_and_not_beyond() -> None:
    # Two half maps share a signal up to shell 6 and carry independent noise beyond it.
    rng = np.random.default_rng(6)
    box = 32
    signal = lowpass(rng.standard_normal((box, box, box)).astype(np.float32), 1.0, box / 6.0)
    halves = [signal + 0.3 * rng.standard_normal((box, box, box)).astype(np.float32) for _ in range(2)]
    mask = soft_spherical_mask(box, 8.0, 2.0)
    unmasked, masked, corrected = mask_corrected_fsc(halves[0], halves[1], mask, np.random.default_rng(1))

    np.testing.assert_allclose(unmasked, fsc_curve(halves[0], halves[1]), atol=1e-12)
    np.testing.assert_allclose(masked, fsc_curve(halves[0] * mask, halves[1] * mask), atol=1e-12)
    falls = int(np.flatnonzero(unmasked >= 0.8)[-1]) + 1
    assert 4 <= falls <= 8
    np.testing.assert_array_equal(corrected[:falls], masked[:falls])
    assert not np.array_equal(corrected[falls:], masked[falls:])
    # Beyond the fall the halves share nothing; the corrected curve stays near zero there.
    assert np.abs(corrected[falls + 2 :]).mean() < 0.1
