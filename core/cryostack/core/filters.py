"""Fourier filters of images and maps: cosine-edged low/high-pass, Butterworth high-pass, B-factor.

Each ``*_response`` function returns the filter on the centred grid of :mod:`cryostack.core.fourier` as a function
of the spatial frequency ``f`` (1/Å); :func:`apply_filter` multiplies a real array's transform by it. Cut-offs are
resolutions in Å (``f_c = 1 / resolution_a``); cosine edges have a width in Fourier shells (``1 / (D · pixel)``).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from cryostack.core.backend import array_module
from cryostack.core.fourier import (
    fft2_centered,
    fft3_centered,
    frequency_radius_px,
    ifft2_centered,
    ifft3_centered,
    resolution_to_shell,
)
from cryostack.errors import InvalidArgumentError

DEFAULT_EDGE_WIDTH_SHELLS = 2.0


def _cosine_step(radius: Any, cutoff: float, width: float) -> Any:
    """1 below ``cutoff - width/2``, 0 above ``cutoff + width/2``, a raised cosine between."""
    xp = array_module(radius)
    if width <= 0:
        return (radius <= cutoff).astype(np.float32)
    t = xp.clip((radius - (cutoff - width / 2)) / width, 0, 1)
    return (0.5 * (1 + xp.cos(np.pi * t))).astype(np.float32)


def lowpass_response(
    box_px: int,
    pixel_size_a: float,
    resolution_a: float,
    ndim: int,
    edge_width_shells: float = DEFAULT_EDGE_WIDTH_SHELLS,
    xp: ModuleType = np,
) -> Any:
    """Cosine-edged low-pass passing frequencies below ``1 / resolution_a``: (D,)*ndim float32."""
    cutoff = resolution_to_shell(box_px, pixel_size_a, resolution_a)
    return _cosine_step(frequency_radius_px(box_px, ndim, xp), cutoff, edge_width_shells)


def highpass_response(
    box_px: int,
    pixel_size_a: float,
    resolution_a: float,
    ndim: int,
    edge_width_shells: float = DEFAULT_EDGE_WIDTH_SHELLS,
    xp: ModuleType = np,
) -> Any:
    """Cosine-edged high-pass removing frequencies below ``1 / resolution_a``: (D,)*ndim float32."""
    return 1 - lowpass_response(box_px, pixel_size_a, resolution_a, ndim, edge_width_shells, xp)


def butterworth_highpass_response(
    box_px: int, pixel_size_a: float, resolution_a: float, order: int, ndim: int, xp: ModuleType = np
) -> Any:
    """Butterworth high-pass ``(f/f_c)^(2n) / (1 + (f/f_c)^(2n))`` of order n (0.5 at f_c): (D,)*ndim float32."""
    if order < 1:
        raise InvalidArgumentError("order", f"must be >= 1, got {order}")
    cutoff = resolution_to_shell(box_px, pixel_size_a, resolution_a)
    ratio = frequency_radius_px(box_px, ndim, xp).astype(np.float64) / cutoff
    power = ratio ** (2 * order)
    return (power / (1 + power)).astype(np.float32)


def bfactor_response(box_px: int, pixel_size_a: float, bfactor_a2: float, ndim: int, xp: ModuleType = np) -> Any:
    """Amplitude envelope ``exp(-B f² / 4)`` (B > 0 blurs, B < 0 sharpens), f in 1/Å: (D,)*ndim float32."""
    if not pixel_size_a > 0:
        raise InvalidArgumentError("pixel_size_a", f"must be positive, got {pixel_size_a}")
    f = frequency_radius_px(box_px, ndim, xp).astype(np.float64) / (box_px * pixel_size_a)
    return xp.exp(-0.25 * bfactor_a2 * f * f).astype(np.float32)


def _ndim(x: Any, ndim: int | None) -> int:
    """Number of trailing axes a filter acts on: ``ndim`` or, if None, all axes of a 2D/3D array."""
    nd = x.ndim if ndim is None else ndim
    if nd not in (2, 3) or x.ndim < nd:
        raise InvalidArgumentError("ndim", f"must be 2 or 3 and at most x.ndim, got {ndim} for shape {x.shape}")
    return nd


def apply_filter(x: Any, response: Any, ndim: int | None = None) -> Any:
    """Multiply the transform of real arrays (..., D, D[, D]) by ``response`` (D,)*ndim; float32 result.

    ``ndim`` defaults to ``x.ndim``; pass ``ndim=2`` for a stack of images (N, D, D).
    """
    nd = _ndim(x, ndim)
    forward, inverse = (fft2_centered, ifft2_centered) if nd == 2 else (fft3_centered, ifft3_centered)
    return inverse(forward(x) * response).real.astype(np.float32)


def lowpass(
    x: Any,
    pixel_size_a: float,
    resolution_a: float,
    ndim: int | None = None,
    edge_width_shells: float = DEFAULT_EDGE_WIDTH_SHELLS,
) -> Any:
    """Cosine-edged low-pass of real arrays (..., D, D[, D]) to ``resolution_a`` (``ndim=2`` for image stacks)."""
    nd = _ndim(x, ndim)
    xp = array_module(x)
    response = lowpass_response(x.shape[-1], pixel_size_a, resolution_a, nd, edge_width_shells, xp)
    return apply_filter(x, response, nd)


def highpass(
    x: Any,
    pixel_size_a: float,
    resolution_a: float,
    ndim: int | None = None,
    edge_width_shells: float = DEFAULT_EDGE_WIDTH_SHELLS,
    order: int | None = None,
) -> Any:
    """High-pass of real arrays above ``1 / resolution_a``: cosine-edged, or Butterworth of ``order`` if given."""
    nd = _ndim(x, ndim)
    xp = array_module(x)
    box = x.shape[-1]
    if order is None:
        response = highpass_response(box, pixel_size_a, resolution_a, nd, edge_width_shells, xp)
    else:
        response = butterworth_highpass_response(box, pixel_size_a, resolution_a, order, nd, xp)
    return apply_filter(x, response, nd)


def apply_bfactor(x: Any, pixel_size_a: float, bfactor_a2: float, ndim: int | None = None) -> Any:
    """Apply the B-factor envelope ``exp(-B f² / 4)`` to real arrays (..., D, D[, D])."""
    nd = _ndim(x, ndim)
    xp = array_module(x)
    return apply_filter(x, bfactor_response(x.shape[-1], pixel_size_a, bfactor_a2, nd, xp), nd)
