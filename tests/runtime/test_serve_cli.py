"""`cryostack serve`: unknown services are refused by the parser; a known service whose servicer module is not
installed gets a clear error naming the module; the service registry finds `register(server, runner)`."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cryostack.cli.main import build_parser
from cryostack.runtime.registry import SERVICE_NAMES, ServiceNotAvailableError, load_registrar, servicer_module


def test_unknown_service_is_refused_with_the_choices():
    result = subprocess.run(
        [sys.executable, "-m", "cryostack.cli.main", "serve", "nosuch"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "invalid choice: 'nosuch'" in result.stderr and "classify2d" in result.stderr


def test_registry_refuses_names_outside_the_stage_services():
    with pytest.raises(ServiceNotAvailableError, match="unknown service 'jobs'"):
        load_registrar("jobs")


@pytest.mark.parametrize("service", SERVICE_NAMES)
def test_each_stage_service_is_either_registrable_or_clearly_missing(service):
    try:
        register = load_registrar(service)
    except ServiceNotAvailableError as error:
        assert servicer_module(service) in str(error)
        args = build_parser().parse_args(["serve", service, "--port", "0"])
        assert args.func(args) == 2
    else:
        assert callable(register)
