"""Helpers of the I/O tests."""

from __future__ import annotations

import numpy as np


def random_images(count: int, box_px: int, seed: int = 0) -> np.ndarray:
    """Gaussian test images (count, box_px, box_px) float32."""
    return np.random.default_rng(seed).standard_normal((count, box_px, box_px), dtype=np.float32)
