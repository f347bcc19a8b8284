"""Soft spherical/circular masks and the automatic mask."""

from __future__ import annotations

import numpy as np
import pytest

from cryostack.core.masks import (
    auto_mask,
    soft_circular_mask,
    soft_circular_mask_a,
    soft_spherical_mask,
    soft_spherical_mask_a,
)
from cryostack.errors import InvalidArgumentError


@pytest.mark.parametrize("box", [32, 33])
def test_soft_sphere_profile(box: int) -> None:
    mask = soft_spherical_mask(box, radius_px=10.0, edge_width_px=4.0)
    assert mask.shape == (box, box, box) and mask.dtype == np.float32
    c = box // 2
    assert mask[c, c, c] == 1.0 and mask[c, c, c + 10] == 1.0
    assert mask[c, c, c + 12] == pytest.approx(0.5, abs=1e-6)  # half-way through the cosine edge
    assert mask[c, c, c + 14] == 0.0 and mask[0, 0, 0] == 0.0
    assert np.all(np.diff(mask[c, c, c:]) <= 0)
    # Volume of the soft ball: the edge contributes half its shell, so ≈ 4/3 π (r + w/2)³.
    assert mask.sum() == pytest.approx(4 / 3 * np.pi * 12**3, rel=0.03)


def test_circle_and_angstrom_variants() -> None:
    circle = soft_circular_mask(40, 12.0, 2.0)
    assert circle.shape == (40, 40) and circle[20, 20] == 1.0 and circle[20, 34] == 0.0
    np.testing.assert_array_equal(soft_circular_mask_a(40, 2.0, 24.0, 4.0), circle)
    np.testing.assert_array_equal(soft_spherical_mask_a(20, 2.0, 12.0, 4.0), soft_spherical_mask(20, 6.0, 2.0))
    np.testing.assert_array_equal(soft_circular_mask(10, 3.0, 0.0), (soft_circular_mask(10, 3.0, 0.0) > 0.5))
    with pytest.raises(InvalidArgumentError):
        soft_spherical_mask(10, -1.0)


def test_auto_mask_covers_the_object_and_excludes_the_background() -> None:
    box, pixel_a = 40, 2.0
    c = np.arange(box) - box // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    # An off-centre ellipsoid plus weak noise.
    inside = ((x - 5) / 8.0) ** 2 + (y / 5.0) ** 2 + ((z + 3) / 6.0) ** 2 <= 1
    rng = np.random.default_rng(0)
    volume = inside.astype(np.float32) + 0.02 * rng.standard_normal((box,) * 3).astype(np.float32)
    mask = auto_mask(volume, pixel_a, lowpass_resolution_a=8.0, dilation_a=4.0, soft_edge_a=6.0)
    assert mask.shape == volume.shape and mask.min() >= 0 and mask.max() <= 1
    assert np.all(mask[inside] == 1.0)
    assert mask[0, 0, 0] == 0.0 and mask[:, :, :4].max() == 0.0
    soft = (mask > 0) & (mask < 1)
    assert soft.sum() > 0.5 * inside.sum()  # a real soft edge, not a binary mask
    with pytest.raises(InvalidArgumentError):
        auto_mask(volume, pixel_a, threshold=10.0)
