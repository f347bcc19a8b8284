"""Radial noise power σ²(ν): from the background around the particles, or from residuals after a model.

σ²(ν) is the expected ``|X(k)|²`` of the centred, unnormalised transform (:mod:`cryostack.core.fourier`) of a D×D
noise image, averaged over shell ν (0 .. D // 2): white noise of pixel variance s² has σ² = D²·s² in every shell.
This is the per-coefficient variance a Gaussian likelihood of Fourier coefficients divides by.

From the background (at start, before any model exists): the particle is hidden by a circular mask, the
autocorrelation of the noise is estimated from the remaining pixel pairs (each lag normalised by how many
background pairs it has, so the mask does not colour the estimate), truncated to lags below D/2, and transformed
to the spectrum (shell 0, lost with each image's mean, takes shell 1's value). From residuals: the shell
average of ``|X - CTF·P|²`` over particles.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cryostack.core.backend import array_module
from cryostack.core.fourier import fft2_centered, ifft2_centered, radial_average
from cryostack.errors import InvalidArgumentError

# Lags seen by fewer background pixel pairs than this fraction of lag 0 are too poorly estimated to use.
_MIN_PAIR_FRACTION = 0.02


def _check_images(images: Any, name: str) -> None:
    """A stack of square images (N, D, D)."""
    if images.ndim != 3 or images.shape[1] != images.shape[2]:
        raise InvalidArgumentError(name, f"expected (N, D, D), got {images.shape}")


def noise_power_from_background(images: Any, particle_radius_px: float) -> Any:
    """σ²(ν) (D // 2 + 1,) float64 from the pixels of real images (N, D, D) outside a centred circle."""
    xp = array_module(images)
    images = xp.asarray(images, dtype=np.float32)
    _check_images(images, "images")
    box = images.shape[-1]
    c = (xp.arange(box) - box // 2).astype(np.float32)
    outside = (c[:, None] ** 2 + c[None, :] ** 2 > np.float32(particle_radius_px) ** 2).astype(np.float32)  # (D, D)
    n_background = float(outside.sum())
    if n_background < 2:
        raise InvalidArgumentError("particle_radius_px", f"leaves no background in a box of {box}")
    # Remove each image's background mean: only fluctuations are noise.
    means = (images * outside).sum(axis=(1, 2)) / n_background
    background = (images - means[:, None, None]) * outside  # (N, D, D)
    # Linear (not circular) autocorrelations through a 2D zero-padded box.
    padded_box = 2 * box
    start = box - box // 2
    region = (slice(None), slice(start, start + box), slice(start, start + box))
    padded = xp.zeros((images.shape[0], padded_box, padded_box), dtype=np.float32)
    padded[region] = background
    mask_padded = xp.zeros((padded_box, padded_box), dtype=np.float32)
    mask_padded[region[1:]] = outside
    products = ifft2_centered(xp.sum(xp.abs(fft2_centered(padded)) ** 2, axis=0)).real  # (2D, 2D) by lag
    pairs = ifft2_centered(xp.abs(fft2_centered(mask_padded)) ** 2).real * images.shape[0]
    # Keep lags |d| < D/2 along both axes: they map one-to-one onto the D×D lag grid.
    half = box // 2
    lags = slice(box - half, box - half + box)
    products, pairs = products[lags, lags], pairs[lags, lags]
    usable = pairs > _MIN_PAIR_FRACTION * pairs[half, half]
    autocorrelation = xp.where(usable, products / xp.where(usable, pairs, 1), 0)  # (D, D), lag 0 at D//2
    spectrum = fft2_centered(autocorrelation.astype(np.float64)).real * box * box  # (D, D)
    power = radial_average(xp.maximum(spectrum, 0), 2)
    # Removing each image's mean leaves no estimate at DC; carry shell 1 over so σ² stays positive there.
    power[0] = power[1]
    return power


def noise_power_from_residuals(images_ft: Any, predictions_ft: Any) -> Any:
    """σ²(ν) (D // 2 + 1,) float64: shell mean of ``|X - P|²`` over centred transforms (N, D, D).

    ``predictions_ft`` are the model's images as the data would show them (CTF applied, shifted).
    """
    xp = array_module(images_ft, predictions_ft)
    _check_images(images_ft, "images_ft")
    if predictions_ft.shape != images_ft.shape:
        raise InvalidArgumentError("predictions_ft", f"shape {predictions_ft.shape} != {images_ft.shape}")
    residual = images_ft - predictions_ft
    power = xp.mean(xp.abs(residual) ** 2, axis=0)  # (D, D)
    return radial_average(power, 2)
