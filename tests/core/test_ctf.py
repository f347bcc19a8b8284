"""CTF: relativistic wavelength, agreement with ASPIRE-Python's CTFFilter, and analytic values.

ASPIRE's ``CTFFilter`` implements the same CTFFIND/RELION model through a different code path (polar grid in
nm, its own wavelength constants) and returns the opposite sign: ``h = √(1-α²) sin(χ') - α cos(χ')`` with
``χ' = -χ``, i.e. ``-CTF``. Its defocus angle is in radians and its envelope is ``exp(-B' s²)`` with s in 1/nm,
so RELION's B (Å², ``exp(-B f²/4)``) is ``B' = B / 400``. Its wavelength formula uses slightly rounded constants
(a 3e-5 relative difference, which moves χ by ~1e-3 rad at high frequency), so the comparison drives ASPIRE at
the voltage for which its formula gives our wavelength.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest
from scipy.optimize import brentq

from cryostack.core.backend import cupy_available
from cryostack.core.ctf import CtfParameters, ctf_2d, ctf_at, electron_wavelength_a, first_zero_frequency_inv_a
from cryostack.core.fourier import frequency_grid_2d
from cryostack.errors import InvalidArgumentError


def _import_aspire(module: str):
    """Import an ASPIRE module, undoing what ASPIRE's import does to logging: its dictConfig disables every logger
    created before it and adds handlers to the root logger, which would silence the rest of the suite's logs."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    existing = {name: logger.disabled for name, logger in logging.Logger.manager.loggerDict.items()
                if isinstance(logger, logging.Logger)}
    imported = pytest.importorskip(module, reason="ASPIRE-Python (dev dependency) is not installed")
    for extra in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(extra)
        extra.close()
    root.setLevel(level)
    for name, disabled in existing.items():
        logging.getLogger(name).disabled = disabled
    return imported


@pytest.fixture(scope="module")
def aspire() -> SimpleNamespace:
    """ASPIRE's CTF operators and utilities, for the tests that compare with it (the others run without ASPIRE)."""
    return SimpleNamespace(operators=_import_aspire("aspire.operators"), utils=_import_aspire("aspire.utils"))


@pytest.mark.parametrize(("voltage_kv", "wavelength_a"), [(300.0, 0.019687), (200.0, 0.025079), (120.0, 0.033492)])
def test_wavelength_known_values(voltage_kv: float, wavelength_a: float) -> None:
    assert electron_wavelength_a(voltage_kv) == pytest.approx(wavelength_a, abs=1e-6)


def test_wavelength_matches_aspire_codata_formula(aspire: SimpleNamespace) -> None:
    for kv in (80.0, 200.0, 300.0):
        assert electron_wavelength_a(kv) == pytest.approx(aspire.utils.voltage_to_wavelength(kv), rel=1e-12)


def _aspire_voltage_for(wavelength_a: float) -> float:
    """Voltage (kV) at which ASPIRE's CTFFilter wavelength (1.22639 / √(V + 0.97845e-6 V²) nm) equals ours."""
    return brentq(lambda kv: 12.2639 / np.sqrt(kv * 1e3 + 0.97845 * kv**2) - wavelength_a, 10.0, 2000.0, xtol=1e-14)


@pytest.mark.parametrize("box", [64, 65])
@pytest.mark.parametrize(
    ("defocus_u_a", "defocus_v_a", "angle_deg", "voltage_kv", "cs_mm", "q", "bfactor_a2", "pixel_a"),
    [
        (21000.0, 18500.0, 37.0, 300.0, 2.7, 0.1, 40.0, 1.5),
        (9000.0, 9000.0, 0.0, 200.0, 2.0, 0.07, 0.0, 1.0),
        (15000.0, 14000.0, -120.0, 300.0, 0.01, 0.15, 0.0, 3.0),
    ],
)
def test_ctf_matches_aspire(
    box: int, defocus_u_a: float, defocus_v_a: float, angle_deg: float, voltage_kv: float, cs_mm: float,
    q: float, bfactor_a2: float, pixel_a: float, aspire: SimpleNamespace,
) -> None:
    ours = ctf_2d(box, pixel_a, defocus_u_a, defocus_v_a, angle_deg, voltage_kv, cs_mm, q, bfactor_a2=bfactor_a2)
    assert ours.shape == (1, box, box) and ours.dtype == np.float32
    aspire_filter = aspire.operators.CTFFilter(
        voltage=_aspire_voltage_for(electron_wavelength_a(voltage_kv)),
        defocus_u=defocus_u_a,
        defocus_v=defocus_v_a,
        defocus_ang=np.deg2rad(angle_deg),
        Cs=cs_mm,
        alpha=q,
        B=bfactor_a2 / 400.0,
    )
    reference = -aspire_filter.evaluate_grid(box, dtype=np.float64, pixel_size=pixel_a)
    np.testing.assert_allclose(ours[0], reference, rtol=0, atol=1e-5)


def test_dc_value_and_phase_shift() -> None:
    q = 0.1
    ctf = ctf_2d(32, 1.0, 10000.0, 10000.0, 0.0, 300.0, 2.7, q)
    assert ctf[0, 16, 16] == pytest.approx(q, abs=1e-7)
    shifted = ctf_2d(32, 1.0, 10000.0, 10000.0, 0.0, 300.0, 2.7, q, phase_shift_deg=90.0)
    assert shifted[0, 16, 16] == pytest.approx(np.sqrt(1 - q * q), abs=1e-7)


def test_first_zero_matches_analytic_position() -> None:
    defocus_a = 12000.0
    wavelength = electron_wavelength_a(300.0)
    # With Cs = 0 and no amplitude contrast, sin(π λ Δf s²) first vanishes at s = 1 / √(λ Δf).
    s0 = 1.0 / np.sqrt(wavelength * defocus_a)
    assert first_zero_frequency_inv_a(defocus_a, 300.0, 0.0, 0.0) == pytest.approx(s0, rel=1e-12)
    line = np.array([0.98, 1.0, 1.02]) * s0
    values = ctf_at(np.zeros(3), line, defocus_a, defocus_a, 0.0, 300.0, 0.0, 0.0)[0]
    assert values[0] > 0 and values[2] < 0 and abs(values[1]) < 1e-5
    # With Cs and amplitude contrast the closed-form zero still is a zero of the evaluated CTF.
    s1 = first_zero_frequency_inv_a(defocus_a, 300.0, 2.7, 0.1)
    near = ctf_at(np.zeros(3), np.array([0.99, 1.0, 1.01]) * s1, defocus_a, defocus_a, 0.0, 300.0, 2.7, 0.1)[0]
    assert near[0] > 0 and near[2] < 0 and abs(near[1]) < 1e-4


def test_astigmatism_axis_uses_defocus_u() -> None:
    angle_deg = 30.0
    s = np.linspace(0.0, 0.2, 50)
    fx, fy = s * np.cos(np.deg2rad(angle_deg)), s * np.sin(np.deg2rad(angle_deg))
    astigmatic = ctf_at(fy, fx, 20000.0, 15000.0, angle_deg, 300.0, 2.7, 0.1)[0]
    round_u = ctf_at(fy, fx, 20000.0, 20000.0, 0.0, 300.0, 2.7, 0.1)[0]
    np.testing.assert_allclose(astigmatic, round_u, atol=1e-6)
    across = ctf_at(fx, -fy, 20000.0, 15000.0, angle_deg, 300.0, 2.7, 0.1)[0]  # perpendicular: defocus V
    np.testing.assert_allclose(across, ctf_at(fx, -fy, 15000.0, 15000.0, 0.0, 300.0, 2.7, 0.1)[0], atol=1e-6)


def test_batched_per_particle_parameters() -> None:
    defocus = np.array([8000.0, 12000.0, 20000.0])
    batch = ctf_2d(33, 2.0, defocus, defocus * 0.9, [0.0, 45.0, 90.0], 300.0, 2.7, 0.1, bfactor_a2=[0, 50, 100])
    assert batch.shape == (3, 33, 33)
    single = ctf_2d(33, 2.0, 12000.0, 10800.0, 45.0, 300.0, 2.7, 0.1, bfactor_a2=50.0)
    np.testing.assert_array_equal(batch[1], single[0])
    fy, fx = frequency_grid_2d(33, 2.0, dtype=np.float64)
    np.testing.assert_array_equal(ctf_at(fy, fx, defocus, defocus * 0.9, [0, 45, 90], 300.0, 2.7, 0.1,
                                         bfactor_a2=[0, 50, 100]), batch)


@pytest.mark.parametrize(
    "kwargs",
    [{"amplitude_contrast": 1.0}, {"voltage_kv": -300.0}, {"defocus_u_a": [1.0, 2.0, 3.0]}, {"cs_mm": -1.0}],
)
def test_invalid_parameters_raise(kwargs: dict) -> None:
    params = dict(defocus_u_a=[1e4, 1e4], defocus_v_a=[1e4, 1e4], defocus_angle_deg=0.0, voltage_kv=300.0,
                  cs_mm=2.7, amplitude_contrast=0.1)
    params.update(kwargs)
    with pytest.raises(InvalidArgumentError):
        ctf_2d(16, 1.0, **params)


@pytest.mark.gpu
def test_cupy_matches_numpy() -> None:
    if not cupy_available():
        pytest.skip("CuPy with a CUDA device is not available")
    import cupy  # noqa: PLC0415

    defocus = np.array([8000.0, 15000.0])
    host = ctf_2d(65, 1.2, defocus, defocus * 0.95, [10.0, 80.0], 300.0, 2.7, 0.1, bfactor_a2=30.0)
    device = ctf_2d(65, 1.2, cupy.asarray(defocus), cupy.asarray(defocus * 0.95), [10.0, 80.0], 300.0, 2.7, 0.1,
                    bfactor_a2=30.0)
    assert isinstance(device, cupy.ndarray)
    np.testing.assert_allclose(cupy.asnumpy(device), host, atol=1e-6)


def test_ctf_parameters_select_particles_and_evaluate_like_ctf_at():
    n = 5
    params = CtfParameters(
        defocus_u_a=np.linspace(10_000.0, 20_000.0, n),
        defocus_v_a=np.linspace(9_500.0, 19_000.0, n),
        defocus_angle_deg=np.linspace(0.0, 80.0, n),
        voltage_kv=np.full(n, 300.0),
        cs_mm=np.full(n, 2.7),
        amplitude_contrast=np.full(n, 0.1),
        phase_shift_deg=np.zeros(n),
        bfactor_a2=np.zeros(n),
    )
    fy, fx = frequency_grid_2d(16, 2.0)
    rows = np.array([3, 1])
    selected = params.take(rows)
    assert len(selected) == 2
    expected = ctf_at(fy, fx, params.defocus_u_a[rows], params.defocus_v_a[rows], params.defocus_angle_deg[rows],
                      300.0, 2.7, 0.1)
    np.testing.assert_array_equal(selected.at(fy, fx), expected)
