"""The real-space constraints ab-initio puts on its volumes before each E-step, as cryoSPARC does: a soft spherical
window, non-negativity above the solvent level and re-centring on the centre of mass."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from cryostack.core.backend import array_module
from cryostack.core.fourier import fft3_centered, ifft3_centered
from cryostack.core.masks import soft_spherical_mask

# Real-space window: full weight inside this fraction of the box radius, a cosine edge to the second.
WINDOW_RADII = (0.8, 0.95)
# Voxels beyond this fraction of the box radius are solvent; their median is the zero of non-negativity.
SOLVENT_RADIUS = 0.8


def real_space_masks(box_px: int, xp: ModuleType = np) -> tuple[Any, Any]:
    """The soft spherical window (D, D, D) float32 and the solvent region (D, D, D) bool of the working box."""
    half = box_px / 2.0
    inner, outer = (f * half for f in WINDOW_RADII)
    window = soft_spherical_mask(box_px, inner, outer - inner, xp)
    solvent = soft_spherical_mask(box_px, SOLVENT_RADIUS * half, 0.0, xp) == 0
    return window, solvent


def constrain(volume: Any, window: Any, solvent: Any) -> Any:
    """Non-negative above the solvent level, windowed and centred on its centre of mass: (D, D, D) float32."""
    xp = array_module(volume)
    positive = xp.maximum(volume - xp.median(volume[solvent]), 0.0) * window
    total = float(positive.sum())
    if total <= 0:
        return volume
    box = volume.shape[0]
    k = xp.arange(box) - box // 2
    centre = np.array([
        float((positive.sum(axis=(0, 1)) * k).sum()),  # x
        float((positive.sum(axis=(0, 2)) * k).sum()),  # y
        float((positive.sum(axis=(1, 2)) * k).sum()),  # z
    ]) / total
    if np.abs(centre).max() < 0.5:
        return positive.astype(np.float32)
    # Shift the content by -centre with a phase ramp (exact for band-limited maps).
    kz, ky, kx = xp.meshgrid(k, k, k, indexing="ij")
    ramp = xp.exp(2j * np.pi * (kx * centre[0] + ky * centre[1] + kz * centre[2]) / box)
    return xp.asarray(ifft3_centered(fft3_centered(positive) * ramp).real, dtype=np.float32)
