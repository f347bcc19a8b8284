"""Fourier conventions of cryostack, defined once.

Centring. A box of D pixels along an axis has its real-space origin at pixel ``D // 2`` (0-based), for odd and
even D alike; the centred transform has its zero frequency (DC) at index ``D // 2`` too, so that index ``i``
holds the integer frequency ``k = i - D // 2``, i.e. ``k / (D * pixel_size_a)`` in 1/Å. For even D, index 0
holds the Nyquist frequency ``-D / 2``; for odd D the frequencies run symmetrically from ``-(D - 1) / 2``.

Scaling. The forward transform is unnormalised and the inverse carries ``1 / D**ndim`` (numpy's "backward"
norm), so ``sum |X|**2 == D**ndim * sum |x|**2`` (Parseval) and the DC term equals the sum of the pixels. A
Fourier-slice projection with this convention is, without any rescaling, the transform of the real-space line
integral (sum over voxels along z).

Axes. Arrays are indexed ``[..., y, x]`` for images and ``[..., z, y, x]`` for volumes (the MRC order), so the
frequency grid of an image is returned as ``(fy, fx)``.

Shifts. :func:`phase_shift_2d` with a shift ``(sx, sy)`` in pixels multiplies coefficient ``(ky, kx)`` by
``exp(-2πi (kx·sx + ky·sy) / D)``, which translates the image content by ``+sx`` along x (towards larger column
index) and ``+sy`` along y (towards larger row index): ``shifted(x, y) = image(x - sx, y - sy)``.

Shells. A coefficient belongs to the integer shell ``round(|k|)`` (:func:`radial_frequency_index`); shells
``0 .. D // 2`` reach Nyquist, corners beyond it have larger indices and are left out of radial statistics.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from cryostack.core.backend import array_module, fft_module, fft_workers
from cryostack.errors import InvalidArgumentError


def _fftn(x: Any, axes: tuple[int, ...], inverse: bool) -> Any:
    """Unshifted n-dimensional FFT over ``axes`` on the device of ``x`` (threaded on CPU)."""
    xp = array_module(x)
    fft = fft_module(xp)
    transform = fft.ifftn if inverse else fft.fftn
    if xp is np:
        return transform(x, axes=axes, workers=fft_workers())
    return transform(x, axes=axes)


def _centered_transform(x: Any, ndim: int, inverse: bool) -> Any:
    """Centred forward or inverse transform over the last ``ndim`` axes, complex64 for single-precision input."""
    xp = array_module(x)
    x = xp.asarray(x)
    if x.ndim < ndim:
        raise InvalidArgumentError("x", f"expected at least {ndim} dimensions, got shape {x.shape}")
    axes = tuple(range(-ndim, 0))
    if x.dtype not in (np.complex128, np.float64, np.complex64, np.float32):
        x = x.astype(np.float32)
    return xp.fft.fftshift(_fftn(xp.fft.ifftshift(x, axes=axes), axes, inverse), axes=axes)


def fft2_centered(x: Any) -> Any:
    """Centred 2D FFT over the last two axes: (..., D, D) real or complex -> (..., D, D) complex."""
    return _centered_transform(x, 2, inverse=False)


def ifft2_centered(x: Any) -> Any:
    """Inverse of :func:`fft2_centered` over the last two axes (complex result; take ``.real`` for images)."""
    return _centered_transform(x, 2, inverse=True)


def fft3_centered(x: Any) -> Any:
    """Centred 3D FFT over the last three axes: (..., D, D, D) -> (..., D, D, D) complex."""
    return _centered_transform(x, 3, inverse=False)


def ifft3_centered(x: Any) -> Any:
    """Inverse of :func:`fft3_centered` over the last three axes (complex result; take ``.real`` for maps)."""
    return _centered_transform(x, 3, inverse=True)


def _check_box(box_px: int) -> int:
    """Validate a box size and return it as int."""
    if int(box_px) != box_px or box_px < 2:
        raise InvalidArgumentError("box_px", f"must be an integer >= 2, got {box_px}")
    return int(box_px)


def _check_pixel_size(pixel_size_a: float) -> float:
    """Validate a pixel size in Å."""
    if not np.isfinite(pixel_size_a) or pixel_size_a <= 0:
        raise InvalidArgumentError("pixel_size_a", f"must be positive, got {pixel_size_a}")
    return float(pixel_size_a)


def centered_frequency_indices(box_px: int, xp: ModuleType = np) -> Any:
    """Integer frequencies ``arange(D) - D // 2`` of the centred transform along one axis: (D,) int."""
    box_px = _check_box(box_px)
    return xp.arange(box_px) - box_px // 2


def centered_coordinates(box_px: int, xp: ModuleType = np) -> Any:
    """Real-space pixel coordinates relative to the origin pixel ``D // 2`` along one axis: (D,) float32."""
    return centered_frequency_indices(box_px, xp).astype(np.float32)


def frequency_grid_2d(
    box_px: int, pixel_size_a: float, xp: ModuleType = np, dtype: Any = np.float32
) -> tuple[Any, Any]:
    """Spatial frequencies (fy, fx) in 1/Å of every coefficient of a centred D×D transform: two (D, D) arrays."""
    pixel_size_a = _check_pixel_size(pixel_size_a)
    f = centered_frequency_indices(box_px, xp).astype(np.float64) / (box_px * pixel_size_a)
    fy, fx = xp.meshgrid(f.astype(dtype), f.astype(dtype), indexing="ij")
    return fy, fx


def frequency_radius_px(box_px: int, ndim: int, xp: ModuleType = np) -> Any:
    """|k| in Fourier pixels (shell units) of every coefficient of a centred transform: (D,)*ndim float32."""
    k = centered_frequency_indices(box_px, xp).astype(np.float32)
    if ndim == 2:
        return xp.sqrt(k[:, None] ** 2 + k[None, :] ** 2)
    if ndim == 3:
        return xp.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)
    raise InvalidArgumentError("ndim", f"must be 2 or 3, got {ndim}")


def radial_frequency_index(box_px: int, ndim: int, xp: ModuleType = np) -> Any:
    """Integer shell ``round(|k|)`` of every coefficient of a centred transform: (D,)*ndim int64."""
    return xp.rint(frequency_radius_px(box_px, ndim, xp)).astype(np.int64)


def n_shells(box_px: int) -> int:
    """Number of radial shells from DC to Nyquist inclusive: ``D // 2 + 1``."""
    return _check_box(box_px) // 2 + 1


def nyquist_frequency_inv_a(pixel_size_a: float) -> float:
    """Nyquist frequency in 1/Å: ``1 / (2 · pixel_size_a)``."""
    return 1.0 / (2.0 * _check_pixel_size(pixel_size_a))


def nyquist_resolution_a(pixel_size_a: float) -> float:
    """Finest resolvable resolution in Å: ``2 · pixel_size_a``."""
    return 2.0 * _check_pixel_size(pixel_size_a)


def resolution_to_shell(box_px: int, pixel_size_a: float, resolution_a: float) -> float:
    """Fourier radius (in shells, fractional) of a resolution in Å: ``D · pixel_size_a / resolution_a``."""
    if not resolution_a > 0:
        raise InvalidArgumentError("resolution_a", f"must be positive, got {resolution_a}")
    return _check_box(box_px) * _check_pixel_size(pixel_size_a) / float(resolution_a)


def shell_to_resolution_a(box_px: int, pixel_size_a: float, shell: float) -> float:
    """Resolution in Å of a (fractional) shell radius; infinite for shell 0."""
    if shell <= 0:
        return float("inf")
    return _check_box(box_px) * _check_pixel_size(pixel_size_a) / float(shell)


def resolution_mask(
    box_px: int, pixel_size_a: float, resolution_a: float, ndim: int = 2, xp: ModuleType = np
) -> Any:
    """Boolean mask of the coefficients with spatial frequency ``<= 1 / resolution_a``: (D,)*ndim bool."""
    radius = resolution_to_shell(box_px, pixel_size_a, resolution_a)
    return frequency_radius_px(box_px, ndim, xp) <= np.float32(radius)


def radial_average(values: Any, ndim: int) -> Any:
    """Mean of real ``values`` (..., D, D[, D]) over each shell 0 .. D // 2: (..., D // 2 + 1) float64."""
    xp = array_module(values)
    box = values.shape[-1]
    count = n_shells(box)
    shells = radial_frequency_index(box, ndim, xp).ravel()
    inside = xp.flatnonzero(shells < count)
    shells = shells[inside]
    lead = values.shape[: values.ndim - ndim]
    rows = values.reshape((-1, box**ndim))[:, inside].astype(np.float64, copy=False)
    n_rows = rows.shape[0]
    # One bincount for all rows: row r's shell s goes to bin r * count + s.
    bins = (xp.arange(n_rows)[:, None] * count + shells[None, :]).ravel()
    sums = xp.bincount(bins, weights=rows.ravel(), minlength=n_rows * count).reshape(n_rows, count)
    counts = xp.bincount(shells, minlength=count).astype(np.float64)
    return (sums / counts).reshape(lead + (count,))


def phase_ramp_2d(shifts_px: Any, box_px: int, ky: Any | None = None, kx: Any | None = None) -> Any:
    """Phase factors ``exp(-2πi (kx·sx + ky·sy) / D)`` translating image content by ``+(sx, sy)`` pixels.

    ``shifts_px`` is (..., 2) as (sx, sy). Without ``ky``/``kx`` the result covers the full centred grid,
    (..., D, D) complex64; with integer frequency arrays ``ky``, ``kx`` of shape (C,) (a coefficient subset,
    e.g. for a scoring kernel) it is (..., C).
    """
    xp = array_module(shifts_px, ky, kx)
    shifts = xp.asarray(shifts_px, dtype=np.float64)
    if shifts.shape[-1] != 2:
        raise InvalidArgumentError("shifts_px", f"last axis must be (sx, sy), got shape {shifts.shape}")
    sx = shifts[..., 0, None]
    sy = shifts[..., 1, None]
    scale = -2.0 * np.pi / box_px
    if ky is None or kx is None:
        k = centered_frequency_indices(box_px, xp).astype(np.float64)
        ramp_x = xp.exp(1j * scale * sx * k).astype(np.complex64)  # (..., D)
        ramp_y = xp.exp(1j * scale * sy * k).astype(np.complex64)  # (..., D)
        return ramp_y[..., :, None] * ramp_x[..., None, :]
    phase = scale * (sx * xp.asarray(kx, dtype=np.float64) + sy * xp.asarray(ky, dtype=np.float64))
    return xp.exp(1j * phase).astype(np.complex64)


def phase_shift_2d(images_ft: Any, shifts_px: Any) -> Any:
    """Translate centred image transforms (..., D, D) by ``shifts_px`` (..., 2) = (sx, sy) pixels (broadcast)."""
    box = images_ft.shape[-1]
    return images_ft * phase_ramp_2d(shifts_px, box)


def coefficient_indices(box_px: int, coefficients: Any, xp: ModuleType | None = None) -> Any:
    """Flat indices (C,) into a centred D×D grid from a boolean (D, D) mask or an integer index list."""
    xp = xp or array_module(coefficients)
    coefficients = xp.asarray(coefficients)
    if coefficients.dtype == bool:
        if coefficients.shape != (box_px, box_px):
            raise InvalidArgumentError(
                "coefficients", f"boolean mask must be ({box_px}, {box_px}), got {coefficients.shape}"
            )
        return xp.flatnonzero(coefficients)
    if coefficients.ndim != 1 or not np.issubdtype(coefficients.dtype, np.integer):
        raise InvalidArgumentError("coefficients", "must be a boolean (D, D) mask or a 1D integer index array")
    if coefficients.size and (int(coefficients.min()) < 0 or int(coefficients.max()) >= box_px * box_px):
        raise InvalidArgumentError("coefficients", f"indices must lie in [0, {box_px * box_px})")
    return coefficients.astype(np.int64, copy=False)


def coefficient_frequencies(box_px: int, flat_indices: Any) -> tuple[Any, Any]:
    """Integer centred frequencies (ky, kx) of flat coefficient indices into a D×D grid: two (C,) int64."""
    half = box_px // 2
    return flat_indices // box_px - half, flat_indices % box_px - half


def centered_coefficients_2d(images: Any, flat_indices: Any) -> Any:
    """Coefficients ``flat_indices`` (C,) of the centred transforms of real images (..., D, D): (..., C) complex64.

    Equal to ``fft2_centered(images).reshape(..., D * D)[..., flat_indices]``, computed with a real FFT and no
    shifts, at a fraction of the cost when only some coefficients are wanted. The centred coefficient at frequency
    ``(ky, kx)`` is the plain transform's at ``(ky mod D, kx mod D)`` (the conjugate of ``(-ky, -kx)`` for
    ``kx < 0``, which a real transform does not store) times ``exp(2πi (ky + kx) h / D)``, the phase of the
    input's ``ifftshift`` by ``h = D // 2`` (a sign for even D).
    """
    xp = array_module(images)
    images = xp.asarray(images, dtype=np.float32)
    if images.ndim < 2 or images.shape[-2] != images.shape[-1]:
        raise InvalidArgumentError("images", f"expected square images (..., D, D), got shape {images.shape}")
    box = images.shape[-1]
    ky, kx = coefficient_frequencies(box, coefficient_indices(box, xp.asarray(flat_indices), xp))
    mirrored = kx < 0
    row = xp.where(mirrored, -ky, ky) % box
    column = xp.abs(kx)
    phase = xp.exp((2j * np.pi * (box // 2) / box) * (ky + kx).astype(np.float64)).astype(np.complex64)
    fft = fft_module(xp)
    options = {"workers": fft_workers()} if xp is np else {}
    half_plane = fft.rfft2(images, axes=(-2, -1), **options)  # (..., D, D // 2 + 1)
    values = half_plane.reshape(images.shape[:-2] + (-1,))[..., row * (box // 2 + 1) + column]
    return (xp.where(mirrored, xp.conj(values), values) * phase).astype(np.complex64)


def fourier_crop_2d(images_ft: Any, new_box_px: int) -> Any:
    """Keep the central ``new_box_px``² coefficients of centred transforms (..., D, D) (Fourier downsampling)."""
    box = images_ft.shape[-1]
    if new_box_px > box:
        raise InvalidArgumentError("new_box_px", f"must be <= the box {box}, got {new_box_px}")
    start = box // 2 - new_box_px // 2
    return images_ft[..., start : start + new_box_px, start : start + new_box_px]


def fourier_crop_3d(volume_ft: Any, new_box_px: int) -> Any:
    """Keep the central ``new_box_px``³ coefficients of a centred transform (..., D, D, D)."""
    box = volume_ft.shape[-1]
    if new_box_px > box:
        raise InvalidArgumentError("new_box_px", f"must be <= the box {box}, got {new_box_px}")
    start = box // 2 - new_box_px // 2
    sl = slice(start, start + new_box_px)
    return volume_ft[..., sl, sl, sl]


def fourier_pad_3d(volume_ft: Any, box_px: int) -> Any:
    """Real map (D, D, D) float32 from a centred transform on a smaller box, zero-padded in Fourier space."""
    xp = array_module(volume_ft)
    small = volume_ft.shape[-1]
    padded = xp.zeros((box_px,) * 3, dtype=np.complex64)
    start = box_px // 2 - small // 2
    window = slice(start, start + small)
    padded[window, window, window] = volume_ft
    return xp.asarray(ifft3_centered(padded).real, dtype=np.float32)
