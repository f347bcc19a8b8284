"""Which stage services exist and where their servicers live: `cryostack.services.<name>.servicer:register`."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryostack.runtime.server import Registrar

SERVICE_NAMES = ("classify2d", "abinitio", "refine", "variability")


class ServiceNotAvailableError(LookupError):
    """The named service is unknown, or its servicer module is not installed."""


def servicer_module(service: str) -> str:
    """The module that defines `register(server, runner)` for a service."""
    return f"cryostack.services.{service}.servicer"


def load_registrar(service: str) -> Registrar:
    """The `register(server, runner)` function of a stage service."""
    if service not in SERVICE_NAMES:
        raise ServiceNotAvailableError(f"unknown service {service!r}; expected one of {', '.join(SERVICE_NAMES)}")
    module_name = servicer_module(service)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        # Only a missing servicer module means "not available"; a missing dependency inside it is a real error.
        if error.name is None or not (module_name == error.name or module_name.startswith(error.name + ".")):
            raise
        raise ServiceNotAvailableError(f"service {service!r} is not available: {module_name} does not exist") from None
    register = getattr(module, "register", None)
    if register is None:
        raise ServiceNotAvailableError(f"{module_name} defines no register(server, runner)")
    return register
