"""Helpers of the I/O tests."""

from __future__ import annotations

import numpy as np

# The real particle sets of the shared data (see its README): STAR file and the stack it refers to.
REAL_SETS = {
    "relion31": ("relion31.star", "relion31.mrcs"),
    "relion30": ("empiar_10076_7.star", "empiar_10076_7.mrc"),
    "aspire17": ("sample_particles_relion31.star", "sample.mrcs"),
}


def random_images(count: int, box_px: int, seed: int = 0) -> np.ndarray:
    """Gaussian test images (count, box_px, box_px) float32."""
    return np.random.default_rng(seed).standard_normal((count, box_px, box_px), dtype=np.float32)
