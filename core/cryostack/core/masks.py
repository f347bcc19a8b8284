"""Real-space masks: soft spheres and circles with a cosine edge, and automatic masks of a map.

Radii are measured from the origin pixel ``D // 2`` (see :mod:`cryostack.core.fourier`). A soft mask is 1 up to
``radius``, falls as ``(1 + cos(π (r - radius) / edge_width)) / 2`` over ``edge_width``, and is 0 beyond.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from cryostack.core.backend import array_module, to_device, to_host
from cryostack.core.filters import lowpass
from cryostack.errors import InvalidArgumentError


def _radius_grid(box_px: int, ndim: int, xp: ModuleType) -> Any:
    """Distance in pixels of every pixel/voxel from the origin ``D // 2``: (D,)*ndim float32."""
    c = (xp.arange(box_px) - box_px // 2).astype(np.float32)
    if ndim == 2:
        return xp.sqrt(c[:, None] ** 2 + c[None, :] ** 2)
    return xp.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2)


def cosine_edge(distance_px: Any, edge_width_px: float) -> Any:
    """Cosine fall-off from 1 at distance <= 0 to 0 at distance >= edge_width_px (a hard step for width 0)."""
    xp = array_module(distance_px)
    if edge_width_px < 0:
        raise InvalidArgumentError("edge_width_px", f"must be non-negative, got {edge_width_px}")
    if edge_width_px == 0:
        return (distance_px <= 0).astype(np.float32)
    t = xp.clip(distance_px / np.float32(edge_width_px), 0, 1)
    return (0.5 * (1 + xp.cos(np.pi * t))).astype(np.float32)


def _soft_mask(box_px: int, radius_px: float, edge_width_px: float, ndim: int, xp: ModuleType) -> Any:
    """Soft ball of ``radius_px`` with a cosine edge of ``edge_width_px``: (D,)*ndim float32."""
    if radius_px < 0:
        raise InvalidArgumentError("radius_px", f"must be non-negative, got {radius_px}")
    return cosine_edge(_radius_grid(box_px, ndim, xp) - np.float32(radius_px), edge_width_px)


def soft_spherical_mask(box_px: int, radius_px: float, edge_width_px: float = 3.0, xp: ModuleType = np) -> Any:
    """Soft spherical mask (D, D, D) float32, radius and cosine edge width in pixels."""
    return _soft_mask(box_px, radius_px, edge_width_px, 3, xp)


def soft_circular_mask(box_px: int, radius_px: float, edge_width_px: float = 3.0, xp: ModuleType = np) -> Any:
    """Soft circular mask (D, D) float32, radius and cosine edge width in pixels."""
    return _soft_mask(box_px, radius_px, edge_width_px, 2, xp)


def soft_spherical_mask_a(
    box_px: int, pixel_size_a: float, radius_a: float, edge_width_a: float, xp: ModuleType = np
) -> Any:
    """Soft spherical mask (D, D, D) float32, radius and edge width in Å."""
    if not pixel_size_a > 0:
        raise InvalidArgumentError("pixel_size_a", f"must be positive, got {pixel_size_a}")
    return soft_spherical_mask(box_px, radius_a / pixel_size_a, edge_width_a / pixel_size_a, xp)


def soft_circular_mask_a(
    box_px: int, pixel_size_a: float, radius_a: float, edge_width_a: float, xp: ModuleType = np
) -> Any:
    """Soft circular mask (D, D) float32, radius and edge width in Å."""
    if not pixel_size_a > 0:
        raise InvalidArgumentError("pixel_size_a", f"must be positive, got {pixel_size_a}")
    return soft_circular_mask(box_px, radius_a / pixel_size_a, edge_width_a / pixel_size_a, xp)


def auto_mask(
    volume: Any,
    pixel_size_a: float,
    *,
    lowpass_resolution_a: float = 15.0,
    threshold: float | None = None,
    threshold_fraction: float = 0.2,
    dilation_a: float = 3.0,
    soft_edge_a: float = 6.0,
) -> Any:
    """Automatic soft mask of a map (D, D, D): low-pass, threshold, dilate, cosine edge; float32 on its device.

    The low-passed map is binarised at ``threshold`` (absolute) or, without it, at ``threshold_fraction`` of its
    maximum; the binary mask is grown by ``dilation_a`` and given a cosine edge of ``soft_edge_a``.
    """
    import scipy.ndimage  # noqa: PLC0415  (host-side distance transform; masks are made once per iteration)

    xp = array_module(volume)
    if volume.ndim != 3:
        raise InvalidArgumentError("volume", f"expected (D, D, D), got {volume.shape}")
    smooth = to_host(lowpass(xp.asarray(volume, dtype=np.float32), pixel_size_a, lowpass_resolution_a, ndim=3))
    level = float(threshold) if threshold is not None else threshold_fraction * float(smooth.max())
    binary = smooth >= level
    if not binary.any():
        raise InvalidArgumentError("threshold", f"no voxel of the low-passed map reaches {level:g}")
    # Distance (in Å) of every voxel outside the binary mask to its nearest voxel inside.
    distance_a = scipy.ndimage.distance_transform_edt(~binary) * pixel_size_a
    mask = cosine_edge((distance_a - dilation_a).astype(np.float32), soft_edge_a)
    return to_device(mask.astype(np.float32), xp)
