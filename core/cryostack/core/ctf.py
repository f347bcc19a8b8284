"""Contrast transfer function in the CTFFIND4 / RELION convention, on the centred grid of :mod:`fourier`.

For a spatial frequency ``g = (gx, gy)`` in 1/Å with azimuth ``θ = atan2(gy, gx)`` (y along image rows):

    Δf(θ) = (U + V)/2 + (U - V)/2 · cos(2 (θ - θ_ast))                  (defocus in Å, positive = underfocus)
    χ(g)  = π λ Δf(θ) |g|² - (π/2) Cs λ³ |g|⁴ + φ + arctan(Q / √(1 - Q²))
    CTF   = sin(χ) · exp(-B |g|² / 4)

with U, V = ``rlnDefocusU/V``, θ_ast = ``rlnDefocusAngle`` (degrees from the x axis), λ the relativistic electron
wavelength, Cs = ``rlnSphericalAberration`` (mm, converted to Å), Q = ``rlnAmplitudeContrast``, φ =
``rlnPhaseShift`` and B = ``rlnCtfBfactor`` (Å²). This is RELION's ``CTF::getCTF`` (which writes it as
``-sin(-χ)``) and CTFFIND4's ``-sin`` of its phase with its sign of defocus; at low frequency the CTF is positive
(≈ Q at DC) and its first zero lies near ``|g| = 1 / √(λ Δf)``.

The phase is evaluated in float64 (χ reaches hundreds of radians at high resolution and large defocus) and the
result returned as float32.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from types import ModuleType
from typing import Any

import numpy as np

from cryostack.core.backend import array_module
from cryostack.core.fourier import frequency_grid_2d
from cryostack.errors import InvalidArgumentError

# CODATA 2018 exact / recommended values (SI).
_PLANCK_J_S = 6.62607015e-34
_ELECTRON_MASS_KG = 9.1093837015e-31
_ELEMENTARY_CHARGE_C = 1.602176634e-19
_SPEED_OF_LIGHT_M_S = 299792458.0


def electron_wavelength_a(voltage_kv: Any) -> Any:
    """Relativistic de Broglie wavelength in Å of electrons accelerated through ``voltage_kv`` kilovolts."""
    xp = array_module(voltage_kv)
    volts = xp.asarray(voltage_kv, dtype=np.float64) * 1e3
    if bool(xp.any(volts <= 0)):
        raise InvalidArgumentError("voltage_kv", "must be positive")
    energy_j = _ELEMENTARY_CHARGE_C * volts
    momentum = xp.sqrt(
        2 * _ELECTRON_MASS_KG * energy_j * (1 + energy_j / (2 * _ELECTRON_MASS_KG * _SPEED_OF_LIGHT_M_S**2))
    )
    wavelength = _PLANCK_J_S / momentum * 1e10
    return float(wavelength) if wavelength.ndim == 0 and xp is np else wavelength


def _per_particle(xp: ModuleType, name: str, value: Any, count: int) -> Any:
    """A scalar or (N,) parameter as a float64 (N,) array."""
    arr = xp.asarray(value, dtype=np.float64).reshape(-1)
    if arr.size == 1:
        arr = xp.broadcast_to(arr, (count,))
    if arr.shape != (count,):
        raise InvalidArgumentError(name, f"expected a scalar or {count} values, got {arr.size}")
    if not bool(xp.all(xp.isfinite(arr))):
        raise InvalidArgumentError(name, "contains NaN or Inf")
    return arr


def ctf_at(
    fy: Any,
    fx: Any,
    defocus_u_a: Any,
    defocus_v_a: Any,
    defocus_angle_deg: Any,
    voltage_kv: Any,
    cs_mm: Any,
    amplitude_contrast: Any,
    phase_shift_deg: Any = 0.0,
    bfactor_a2: Any = 0.0,
) -> Any:
    """CTF of N particles at frequencies ``fy``, ``fx`` (any shape F, 1/Å): (N, *F) float32.

    Every CTF parameter is a scalar or an (N,) array (per particle); N is the longest of them.
    """
    xp = array_module(fy, fx, defocus_u_a, defocus_v_a)
    fy = xp.asarray(fy, dtype=np.float64)
    fx = xp.asarray(fx, dtype=np.float64)
    if fy.shape != fx.shape:
        raise InvalidArgumentError("fx", f"fy {fy.shape} and fx {fx.shape} differ in shape")
    params = {
        "defocus_u_a": defocus_u_a,
        "defocus_v_a": defocus_v_a,
        "defocus_angle_deg": defocus_angle_deg,
        "voltage_kv": voltage_kv,
        "cs_mm": cs_mm,
        "amplitude_contrast": amplitude_contrast,
        "phase_shift_deg": phase_shift_deg,
        "bfactor_a2": bfactor_a2,
    }
    count = max(int(np.size(v)) for v in params.values())
    p = {name: _per_particle(xp, name, value, count) for name, value in params.items()}
    q = p["amplitude_contrast"]
    if bool(xp.any((q < 0) | (q >= 1))):
        raise InvalidArgumentError("amplitude_contrast", "must lie in [0, 1)")
    if bool(xp.any(p["cs_mm"] < 0)):
        raise InvalidArgumentError("cs_mm", "must be non-negative")
    wavelength = electron_wavelength_a(p["voltage_kv"])  # (N,) Å
    cs_a = p["cs_mm"] * 1e7
    mean = 0.5 * (p["defocus_u_a"] + p["defocus_v_a"])
    half_diff = 0.5 * (p["defocus_u_a"] - p["defocus_v_a"])
    two_angle = 2 * xp.deg2rad(p["defocus_angle_deg"])
    # cos(2(θ - θa))|g|² = (gx² - gy²) cos 2θa + 2 gx gy sin 2θa: no atan2 and no special case at DC.
    s2 = fx * fx + fy * fy
    basis = xp.stack([s2, fx * fx - fy * fy, 2 * fx * fy, s2 * s2], axis=0).reshape(4, -1)  # (4, F)
    k = np.pi * wavelength
    coefficients = xp.stack(
        [k * mean, k * half_diff * xp.cos(two_angle), k * half_diff * xp.sin(two_angle),
         -0.5 * np.pi * cs_a * wavelength**3],
        axis=1,
    )  # (N, 4)
    offset = xp.deg2rad(p["phase_shift_deg"]) + xp.arctan(q / xp.sqrt(1 - q * q))  # (N,)
    chi = coefficients @ basis + offset[:, None]  # (N, F) float64
    out = xp.sin(chi)
    if bool(xp.any(p["bfactor_a2"] != 0)):
        out *= xp.exp(-0.25 * p["bfactor_a2"][:, None] * basis[0][None, :])
    return out.astype(np.float32).reshape((count,) + fy.shape)


@dataclass(frozen=True)
class CtfParameters:
    """Per-particle CTF parameters, each (N,) float64, in this module's convention (units in the names)."""

    defocus_u_a: np.ndarray
    defocus_v_a: np.ndarray
    defocus_angle_deg: np.ndarray
    voltage_kv: np.ndarray
    cs_mm: np.ndarray
    amplitude_contrast: np.ndarray
    phase_shift_deg: np.ndarray
    bfactor_a2: np.ndarray

    def __len__(self) -> int:
        return len(self.defocus_u_a)

    def take(self, rows: np.ndarray) -> CtfParameters:
        """The parameters of the particles at ``rows``."""
        return CtfParameters(**{f.name: np.asarray(getattr(self, f.name))[rows] for f in fields(self)})

    def at(self, fy: Any, fx: Any) -> Any:
        """CTF of every particle at frequencies ``fy``, ``fx`` (any shape F, 1/Å): (N, *F) float32."""
        return ctf_at(fy, fx, *(getattr(self, f.name) for f in fields(self)))


def ctf_2d(
    box_px: int,
    pixel_size_a: float,
    defocus_u_a: Any,
    defocus_v_a: Any,
    defocus_angle_deg: Any,
    voltage_kv: Any,
    cs_mm: Any,
    amplitude_contrast: Any,
    phase_shift_deg: Any = 0.0,
    bfactor_a2: Any = 0.0,
    xp: ModuleType | None = None,
) -> Any:
    """CTF of N particles on the centred D×D Fourier grid: (N, D, D) float32 (see the module docstring)."""
    xp = xp or array_module(defocus_u_a, defocus_v_a)
    fy, fx = frequency_grid_2d(box_px, pixel_size_a, xp, dtype=np.float64)
    return ctf_at(
        fy, fx, defocus_u_a, defocus_v_a, defocus_angle_deg, voltage_kv, cs_mm, amplitude_contrast,
        phase_shift_deg, bfactor_a2,
    )


def first_zero_frequency_inv_a(defocus_a: float, voltage_kv: float, cs_mm: float, amplitude_contrast: float,
                               phase_shift_deg: float = 0.0) -> float:
    """Spatial frequency (1/Å) of the first CTF zero of a non-astigmatic CTF, solved in closed form."""
    wavelength = electron_wavelength_a(voltage_kv)
    offset = np.deg2rad(phase_shift_deg) + np.arctan(amplitude_contrast / np.sqrt(1 - amplitude_contrast**2))
    # χ(s²) = a s² - b s⁴ + offset reaches π at its first zero: b x² - a x + (π - offset) = 0, x = s².
    a = np.pi * wavelength * defocus_a
    b = 0.5 * np.pi * cs_mm * 1e7 * wavelength**3
    c = np.pi - offset
    x = c / a if b == 0 else (a - np.sqrt(a * a - 4 * b * c)) / (2 * b)
    return float(np.sqrt(x))
