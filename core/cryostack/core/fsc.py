"""Fourier shell (3D) and ring (2D) correlation, and the resolution at which it crosses a threshold.

Shells follow :func:`cryostack.core.fourier.radial_frequency_index`: shell ``i`` (0 .. D // 2) holds the
coefficients with ``round(|k|) == i`` and sits at spatial frequency ``i / (D · pixel_size_a)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cryostack.core.backend import array_module, to_host
from cryostack.core.fourier import (
    fft2_centered,
    fft3_centered,
    ifft3_centered,
    n_shells,
    radial_frequency_index,
)
from cryostack.errors import InvalidArgumentError

HALF_MAP_THRESHOLD = 0.143
REFERENCE_THRESHOLD = 0.5


def _shell_sums(values: Any, shells: Any, count: int) -> Any:
    """Sum real values (R, F) per shell for each row: (R, count) float64 (one bincount for all rows)."""
    xp = array_module(values)
    rows = values.shape[0]
    bins = (xp.arange(rows)[:, None] * count + shells[None, :]).ravel()
    sums = xp.bincount(bins, weights=values.ravel().astype(np.float64), minlength=rows * count)
    return sums.reshape(rows, count)


def _correlation(ft_a: Any, ft_b: Any, ndim: int) -> Any:
    """Per-shell correlation of centred transforms (R, D, ..., D): (R, D // 2 + 1) float64."""
    xp = array_module(ft_a)
    box = ft_a.shape[-1]
    count = n_shells(box)
    shells = radial_frequency_index(box, ndim, xp).ravel()
    inside = xp.flatnonzero(shells < count)
    shells = shells[inside]
    a = ft_a.reshape(ft_a.shape[0], -1)[:, inside]
    b = ft_b.reshape(ft_b.shape[0], -1)[:, inside]
    cross = _shell_sums((a * xp.conj(b)).real, shells, count)
    power_a = _shell_sums((a * xp.conj(a)).real, shells, count)
    power_b = _shell_sums((b * xp.conj(b)).real, shells, count)
    denominator = xp.sqrt(power_a * power_b)
    safe = xp.where(denominator > 0, denominator, 1.0)
    return xp.where(denominator > 0, cross / safe, 0.0)


def _check_pair(map_a: Any, map_b: Any) -> None:
    """Both maps share a square/cubic shape."""
    if map_a.shape != map_b.shape:
        raise InvalidArgumentError("map_b", f"shape {map_b.shape} differs from map_a {map_a.shape}")
    if len(set(map_a.shape[-2:])) != 1:
        raise InvalidArgumentError("map_a", f"expected square or cubic maps, got {map_a.shape}")


def fsc_curve(map_a: Any, map_b: Any) -> Any:
    """FSC of two real maps (D, D, D), or FRC of two images (D, D): (D // 2 + 1,) float64 on their device."""
    xp = array_module(map_a, map_b)
    map_a, map_b = xp.asarray(map_a), xp.asarray(map_b)
    _check_pair(map_a, map_b)
    if map_a.ndim == 3 and len(set(map_a.shape)) == 1:
        return _correlation(fft3_centered(map_a)[None], fft3_centered(map_b)[None], 3)[0]
    if map_a.ndim == 2:
        return _correlation(fft2_centered(map_a)[None], fft2_centered(map_b)[None], 2)[0]
    raise InvalidArgumentError("map_a", f"expected (D, D) or (D, D, D), got {map_a.shape}")


def frc_curves(images_a: Any, images_b: Any) -> Any:
    """FRC of each pair of images in two stacks (N, D, D): (N, D // 2 + 1) float64."""
    xp = array_module(images_a, images_b)
    images_a, images_b = xp.asarray(images_a), xp.asarray(images_b)
    _check_pair(images_a, images_b)
    if images_a.ndim != 3:
        raise InvalidArgumentError("images_a", f"expected (N, D, D), got {images_a.shape}")
    return _correlation(fft2_centered(images_a), fft2_centered(images_b), 2)


def shell_frequencies_inv_a(box_px: int, pixel_size_a: float) -> np.ndarray:
    """Spatial frequency in 1/Å of each shell 0 .. D // 2: (D // 2 + 1,) float64."""
    if not pixel_size_a > 0:
        raise InvalidArgumentError("pixel_size_a", f"must be positive, got {pixel_size_a}")
    return np.arange(n_shells(box_px)) / (box_px * pixel_size_a)


def resolution_at_threshold(fsc: Any, box_px: int, pixel_size_a: float, threshold: float = HALF_MAP_THRESHOLD) -> float:
    """Resolution in Å where the curve first falls below ``threshold`` (linear crossing in frequency).

    Scanning from shell 1, the crossing is interpolated between the last shell at or above the threshold and the
    first below it; a curve that never falls below it gives the resolution of the last shell (Nyquist for even D).
    """
    curve = np.asarray(to_host(fsc), dtype=np.float64)
    freqs = shell_frequencies_inv_a(box_px, pixel_size_a)
    if curve.shape != freqs.shape:
        raise InvalidArgumentError("fsc", f"expected {freqs.size} shells for box {box_px}, got {curve.shape}")
    below = np.flatnonzero(curve[1:] < threshold)
    if below.size == 0:
        return float(1.0 / freqs[-1])
    i = int(below[0]) + 1
    upper, lower = curve[i - 1], curve[i]
    fraction = (upper - threshold) / (upper - lower) if upper != lower else 0.0
    frequency = freqs[i - 1] + fraction * (freqs[i] - freqs[i - 1])
    return float("inf") if frequency <= 0 else float(1.0 / frequency)


# The unmasked FSC below which phases are randomised for the mask correction (RELION's choice).
RANDOMISE_BELOW_FSC = 0.8


def phase_randomised(volume: Any, from_shell: int, rng: np.random.Generator) -> Any:
    """A map (D, D, D) whose Fourier phases from shell ``from_shell`` on are random, amplitudes kept.

    The random phases are those of white real-space noise, so the result stays real (Friedel-symmetric).
    """
    xp = array_module(volume)
    box = volume.shape[-1]
    noise_phase = fft3_centered(xp.asarray(rng.standard_normal(volume.shape), dtype=np.float32))
    noise_phase = noise_phase / xp.maximum(xp.abs(noise_phase), 1e-30)
    ft = fft3_centered(volume)
    outer = radial_frequency_index(box, 3, xp) >= from_shell
    randomised = xp.where(outer, xp.abs(ft) * noise_phase, ft)
    return xp.asarray(ifft3_centered(randomised).real, dtype=np.float32)


def mask_corrected_fsc(half_a: Any, half_b: Any, mask: Any, rng: np.random.Generator) -> tuple[Any, Any, Any]:
    """Unmasked, masked and phase-randomisation-corrected masked FSC of two half maps (Chen et al. 2013).

    Beyond the last shell where the unmasked FSC is at least :data:`RANDOMISE_BELOW_FSC`, both half maps' phases
    are randomised; the FSC of the masked randomised maps measures what the mask alone correlates, and the
    corrected FSC is ``(FSC_masked − FSC_random) / (1 − FSC_random)`` there (the masked FSC below). Returns three
    (D // 2 + 1,) float64 curves.
    """
    unmasked = to_host(fsc_curve(half_a, half_b)).astype(np.float64)
    masked = to_host(fsc_curve(half_a * mask, half_b * mask)).astype(np.float64)
    # The shell after the last one at or above the threshold: a dip in the first noisy shells is not the fall.
    holds = np.flatnonzero(unmasked >= RANDOMISE_BELOW_FSC)
    from_shell = int(holds[-1]) + 1 if holds.size else 1
    corrected = masked.copy()
    if from_shell < unmasked.size:
        random_a = phase_randomised(half_a, from_shell, rng)
        random_b = phase_randomised(half_b, from_shell, rng)
        random = to_host(fsc_curve(random_a * mask, random_b * mask)).astype(np.float64)
        tail = slice(from_shell, None)
        # Where the mask alone correlates the halves completely, nothing is left to measure.
        room = 1.0 - random[tail]
        corrected[tail] = np.where(room > 1e-3, (masked[tail] - random[tail]) / np.maximum(room, 1e-3), 0.0)
    return unmasked, masked, corrected
