"""Phantom volumes: chirality, hinge motion of the domain only, the absent state, size and grey scale."""

from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.transform import Rotation

from cryostack.core.phantom import (
    HINGE_POINT,
    BlobPhantom,
    MapPhantom,
    grid_coordinates,
    hinge_rotation,
    particle_radius_px,
    resize_volume,
)
from cryostack.errors import InvalidArgumentError



def centroid(volume: np.ndarray) -> np.ndarray:
    """Mass centre (x, y, z) of a volume in box fractions."""
    x, y, z = grid_coordinates(volume.shape[0])
    weights = volume.astype(np.float64) / volume.sum()
    return np.array([np.sum(weights * c) for c in (x, y, z)])


# The four sign patterns of a principal frame that keep it right-handed (proper rotations of each other).
PROPER_SIGNS = [(1, 1, 1), (-1, -1, 1), (-1, 1, -1), (1, -1, -1)]


def canonical_pose(volume: np.ndarray, signs: tuple[int, int, int]) -> np.ndarray:
    """The volume resampled with its mass centre at the origin and its principal axes (right-handed) along x, y, z."""
    box_px = volume.shape[0]
    x, y, z = grid_coordinates(box_px)
    points = np.stack([x, y, z], axis=-1).reshape(-1, 3).astype(np.float64)
    weights = np.clip(volume, 0, None).reshape(-1).astype(np.float64)
    weights /= weights.sum()
    center = weights @ points
    centred = points - center
    _, axes = np.linalg.eigh((centred * weights[:, None]).T @ centred)
    if np.linalg.det(axes) < 0:
        axes[:, 2] *= -1
    axes = axes * np.asarray(signs, dtype=np.float64)
    source_xyz = points @ axes.T + center  # (V, 3) where each output voxel samples the input
    source_index = source_xyz[:, ::-1].T * box_px + box_px // 2  # (3, V) in (z, y, x) index order
    return ndimage.map_coordinates(volume, source_index, order=1, mode="constant").reshape(volume.shape)


def distance_up_to_rotation(a: np.ndarray, b: np.ndarray) -> float:
    """Relative L2 distance between two volumes after aligning both to their principal frames."""
    reference = canonical_pose(b, PROPER_SIGNS[0])
    return min(
        float(np.linalg.norm(canonical_pose(a, signs) - reference) / np.linalg.norm(reference))
        for signs in PROPER_SIGNS
    )


@pytest.mark.parametrize("box_px", [32, 33])
def test_blob_phantom_has_a_hand_in_every_conformation(box_px: int) -> None:
    phantom = BlobPhantom(box_px)
    for hinge_deg, present in [(0.0, True), (30.0, True), (60.0, True), (0.0, False)]:
        volume = phantom.volume(hinge_deg, present)
        rotation = Rotation.from_euler("zyz", [40, 70, -25], degrees=True).as_matrix()[::-1, ::-1]
        center = np.full(3, box_px // 2)
        rotated = ndimage.affine_transform(volume, rotation, offset=center - rotation @ center, order=1)
        # Control: a rotated copy is recognised as the same object, so the comparison can tell hands apart.
        assert distance_up_to_rotation(rotated, volume) < 0.1
        assert distance_up_to_rotation(volume[:, :, ::-1], volume) > 0.3


@pytest.mark.parametrize("box_px", [48, 33])
def test_protein_fills_about_sixty_percent_of_the_box_on_a_fixed_grey_scale(box_px: int) -> None:
    volume = BlobPhantom(box_px).volume(30.0)
    assert volume.dtype == np.float32 and volume.shape == (box_px,) * 3
    diameter_fraction = 2 * particle_radius_px(volume) / box_px
    assert 0.5 <= diameter_fraction <= 0.7
    assert volume.min() >= 0.0
    assert 1.0 <= volume.max() <= 2.0
    edges = np.concatenate([volume[0].ravel(), volume[-1].ravel(), volume[:, 0].ravel(), volume[:, :, 0].ravel()])
    assert edges.max() < 1e-4


def test_hinge_rotates_only_the_domain_about_the_hinge_axis() -> None:
    box_px = 40
    phantom = BlobPhantom(box_px)
    core = phantom.core_volume()
    domain_0 = phantom.domain_volume(0.0)
    for hinge_deg in (25.0, 60.0):
        volume = phantom.volume(hinge_deg)
        np.testing.assert_allclose(volume - phantom.domain_volume(hinge_deg), core, atol=1e-6)
        domain = volume - core
        # The domain is rigidly moved: same mass, centroid rotated about the hinge point.
        assert domain.sum() == pytest.approx(domain_0.sum(), rel=1e-4)
        pivot = np.asarray(HINGE_POINT)
        expected = pivot + hinge_rotation(hinge_deg) @ (centroid(domain_0) - pivot)
        np.testing.assert_allclose(centroid(domain), expected, atol=1e-4)
        # Far from both domain positions nothing changes.
        untouched = (domain_0 < 1e-4) & (domain < 1e-4)
        assert untouched.sum() > 0.5 * volume.size
        assert np.abs(volume - phantom.volume(0.0))[untouched].max() < 1e-4
        assert np.linalg.norm(centroid(domain) - centroid(domain_0)) * box_px > 1.5


def test_absent_state_lacks_exactly_the_domain_mass() -> None:
    phantom = BlobPhantom(40)
    present = phantom.volume(0.0)
    absent = phantom.volume(0.0, domain_present=False)
    domain = phantom.domain_volume(0.0)
    np.testing.assert_allclose(present - absent, domain, atol=1e-6)
    assert 0.25 <= domain.sum() / present.sum() <= 0.45
    where_domain = domain > 0.5 * domain.max()
    assert absent[where_domain].mean() < 0.1 * present[where_domain].mean()
    assert phantom.volume(45.0, domain_present=False) == pytest.approx(absent)


@pytest.fixture(scope="module")
def real_map(shared_data_dir: Path) -> np.ndarray:
    """The projected potential of PDB 3J9G (64³, 4.4 Å/px): a real structure, positive where it matters."""
    with mrcfile.open(shared_data_dir / "maps" / "3j9g_potential_ps4_4.mrc", permissive=True) as mrc:
        return np.asarray(mrc.data, dtype=np.float32)


def test_map_phantom_splits_an_input_map_into_core_and_hinged_domain(real_map: np.ndarray) -> None:
    phantom = MapPhantom(real_map, domain_fraction=0.35)
    np.testing.assert_allclose(phantom.volume(0.0), real_map, atol=1e-5 * np.abs(real_map).max())
    total = real_map.sum()
    domain_0 = phantom.domain_volume(0.0)
    absent = phantom.volume(0.0, domain_present=False)
    assert domain_0.sum() / total == pytest.approx(0.35, abs=0.05)
    assert absent.sum() / total == pytest.approx(1 - domain_0.sum() / total, abs=1e-4)
    # The cut is a plane: the domain's mass lies on the far side of the core's.
    assert np.linalg.norm(centroid(domain_0) - centroid(absent)) * real_map.shape[0] > 5.0
    rotated = phantom.domain_volume(40.0)
    assert rotated.sum() == pytest.approx(domain_0.sum(), rel=0.02)
    pivot = np.asarray(phantom.hinge_point)
    expected = pivot + hinge_rotation(40.0, phantom.hinge_axis) @ (centroid(domain_0) - pivot)
    np.testing.assert_allclose(centroid(rotated), expected, atol=0.5 / real_map.shape[0])
    np.testing.assert_allclose(phantom.volume(40.0) - rotated, phantom.core_volume(), atol=1e-6 * real_map.max())


def test_map_phantom_rejects_non_cubic_or_non_finite_maps() -> None:
    with pytest.raises(InvalidArgumentError, match="volume"):
        MapPhantom(np.ones((8, 8, 9), dtype=np.float32))
    bad = np.ones((8, 8, 8), dtype=np.float32)
    bad[1, 2, 3] = np.nan
    with pytest.raises(InvalidArgumentError, match="NaN"):
        MapPhantom(bad)


def test_resize_volume_keeps_density_values_and_geometry() -> None:
    fine = BlobPhantom(64).volume(30.0)
    coarse = BlobPhantom(32).volume(30.0)
    resized = resize_volume(fine, 32)
    # The phantom is smooth, so Fourier cropping agrees with rendering directly on the coarse grid.
    assert np.abs(resized - coarse).max() < 0.02 * coarse.max()
    odd = BlobPhantom(21).volume(0.0)
    np.testing.assert_allclose(resize_volume(resize_volume(odd, 35), 21), odd, atol=1e-5)
