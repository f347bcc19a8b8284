"""Quality measures of 2D class averages against ground truth (for tests and benchmarks).

A class average lives in its own in-plane frame, so it is compared with a reference image after the best
in-plane rotation (a grid of angles) and translation (the peak of the circular cross-correlation): the normalised
correlation of the aligned pair inside a circular mask, optionally after a low-pass of both to a resolution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cryostack.core.filters import lowpass
from cryostack.core.fourier import fft2_centered, ifft2_centered
from cryostack.core.fsc import frc_curves
from cryostack.core.geometry import rotation_matrix_2d
from cryostack.core.projection import Projector2D


@dataclass(frozen=True)
class Alignment2D:
    """The best in-plane alignment of an image onto a reference."""

    correlation: float  # normalised correlation inside the mask after alignment
    angle_deg: float  # in-plane rotation applied to the image (Projector2D convention)
    shift_px: tuple[int, int]  # (sx, sy) whole-pixel translation applied after the rotation
    aligned: np.ndarray  # (D, D) float32 the rotated, translated image


def _masked_correlation(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Normalised correlation of each image in ``a`` (..., D, D) with ``b`` (D, D) over the pixels in ``mask``."""
    a_values = a[..., mask]
    b_values = b[mask]
    a_centred = a_values - a_values.mean(axis=-1, keepdims=True)
    b_centred = b_values - b_values.mean()
    denominator = np.sqrt((a_centred**2).sum(axis=-1) * (b_centred**2).sum())
    safe = np.where(denominator > 0, denominator, 1.0)
    return np.where(denominator > 0, (a_centred * b_centred).sum(axis=-1) / safe, 0.0)


def align_to_reference(
    image: np.ndarray, reference: np.ndarray, *, angle_step_deg: float = 2.0, mask_radius_px: float | None = None
) -> Alignment2D:
    """Rotate and translate ``image`` (D, D) to best match ``reference`` (D, D) by normalised correlation."""
    box = image.shape[-1]
    radius = box / 2 if mask_radius_px is None else mask_radius_px
    coords = np.arange(box) - box // 2
    mask = coords[:, None] ** 2 + coords[None, :] ** 2 <= radius**2
    angles = np.arange(0.0, 360.0, angle_step_deg)
    rotated_ft = Projector2D(image.astype(np.float32)).rotate(rotation_matrix_2d(angles))[0]  # (R, D, D)
    reference_ft = fft2_centered(reference.astype(np.float32))
    cross = ifft2_centered(rotated_ft * np.conj(reference_ft)[None]).real  # (R, D, D) lag at D // 2
    peak = cross.reshape(angles.size, -1).argmax(axis=1)
    lag_y, lag_x = np.divmod(peak, box)
    shifts = np.stack([-(lag_x - box // 2), -(lag_y - box // 2)], axis=1)  # (R, 2) moves the image onto it
    rotated = ifft2_centered(rotated_ft).real  # (R, D, D)
    moved = np.stack([np.roll(rotated[r], (shifts[r, 1], shifts[r, 0]), axis=(0, 1)) for r in range(angles.size)])
    scores = _masked_correlation(moved, reference, mask)
    best = int(np.argmax(scores))
    return Alignment2D(
        correlation=float(scores[best]),
        angle_deg=float(angles[best]),
        shift_px=(int(shifts[best, 0]), int(shifts[best, 1])),
        aligned=moved[best].astype(np.float32),
    )


def best_reference_correlation(
    image: np.ndarray,
    references: np.ndarray,
    *,
    pixel_size_a: float,
    lowpass_a: float | None = None,
    angle_step_deg: float = 3.0,
    mask_radius_px: float | None = None,
) -> tuple[float, int]:
    """Highest aligned correlation of ``image`` (D, D) with any of ``references`` (M, D, D), and which one."""
    if lowpass_a is not None:
        image = lowpass(image, pixel_size_a, lowpass_a, ndim=2)
        references = lowpass(references, pixel_size_a, lowpass_a, ndim=2)
    scores = [
        align_to_reference(image, reference, angle_step_deg=angle_step_deg, mask_radius_px=mask_radius_px).correlation
        for reference in references
    ]
    best = int(np.argmax(scores))
    return float(scores[best]), best


def aligned_frc(image: np.ndarray, reference: np.ndarray, *, angle_step_deg: float = 2.0) -> np.ndarray:
    """FRC (D // 2 + 1,) of ``image`` with ``reference`` after aligning the image onto it."""
    aligned = align_to_reference(image, reference, angle_step_deg=angle_step_deg).aligned
    return np.asarray(frc_curves(aligned[None], reference[None].astype(np.float32))[0])
