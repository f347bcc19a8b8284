"""The one array-backend switch: numpy + scipy.fft on CPU, CuPy on GPU.

A process chooses its backend once (`CRYOSTACK_BACKEND` = ``auto`` | ``numpy`` | ``cupy``). Library code does
not consult the switch: it takes its array module from its inputs with :func:`array_module`, so the same
function runs on whichever device its arrays live on. Data crosses to the device with :func:`to_device` and
back with :func:`to_host`, deliberately, at function boundaries.
"""

from __future__ import annotations

import functools
import os
from types import ModuleType
from typing import Any

import numpy as np

BACKEND_ENV_VAR = "CRYOSTACK_BACKEND"


def cupy_available() -> bool:
    """True when CuPy imports and at least one CUDA device is visible."""
    try:
        import cupy  # noqa: PLC0415

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # noqa: BLE001  (any import or driver failure means: no GPU backend)
        return False


@functools.cache
def default_backend_name() -> str:
    """The backend this process uses for new arrays: ``numpy`` or ``cupy``, chosen once."""
    requested = os.environ.get(BACKEND_ENV_VAR, "auto").strip().lower()
    if requested not in ("auto", "numpy", "cupy"):
        raise ValueError(f"{BACKEND_ENV_VAR}={requested!r}: expected auto, numpy or cupy")
    if requested == "numpy":
        return "numpy"
    if requested == "cupy":
        if not cupy_available():
            raise RuntimeError(f"{BACKEND_ENV_VAR}=cupy but CuPy or a CUDA device is not available")
        return "cupy"
    return "cupy" if cupy_available() else "numpy"


def default_xp() -> ModuleType:
    """The array module (numpy or cupy) of this process's backend."""
    if default_backend_name() == "cupy":
        import cupy  # noqa: PLC0415

        return cupy
    return np


def array_module(*arrays: Any) -> ModuleType:
    """The array module (numpy or cupy) the given arrays live in; numpy for host arrays and scalars."""
    for array in arrays:
        module = type(array).__module__
        if module.startswith("cupy"):
            import cupy  # noqa: PLC0415

            return cupy
    return np


def fft_module(xp: ModuleType) -> Any:
    """The FFT namespace for an array module: multi-threaded scipy.fft on CPU, cupy.fft on GPU."""
    if xp is np:
        import scipy.fft  # noqa: PLC0415

        return scipy.fft
    return xp.fft


def fft_workers() -> int:
    """Threads scipy.fft may use (all cores this process may run on)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def to_device(array: Any, xp: ModuleType) -> Any:
    """Move an array to the device of ``xp`` (a no-op when it already lives there)."""
    return xp.asarray(array)


def to_host(array: Any) -> np.ndarray:
    """Move an array to host memory as numpy."""
    if type(array).__module__.startswith("cupy"):
        return array.get()
    return np.asarray(array)


def describe_backend() -> dict[str, str]:
    """Backend facts for job metadata: name and, on GPU, the device."""
    name = default_backend_name()
    facts = {"backend": name}
    if name == "cupy":
        import cupy  # noqa: PLC0415

        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        facts["device"] = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    return facts
