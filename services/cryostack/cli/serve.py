"""`cryostack serve <service>`: run one replica of a stage's gRPC service until SIGTERM."""

from __future__ import annotations

import argparse
import logging
import sys

from cryostack.runtime.registry import SERVICE_NAMES, ServiceNotAvailableError, load_registrar


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the `serve` subcommand."""
    parser = subparsers.add_parser(
        "serve",
        help="run one gRPC service replica",
        description="Serve one stage's gRPC service, the job API, health and reflection. Settings come from "
        "CRYOSTACK_* (service) and CRYOSTACK_S3_* (object store) environment variables.",
    )
    parser.add_argument("service", choices=SERVICE_NAMES, help="the stage service to serve")
    parser.add_argument("--host", help="address to bind (default: CRYOSTACK_HOST or 127.0.0.1)")
    parser.add_argument("--port", type=int, help="gRPC port (default: CRYOSTACK_PORT; 0 picks a free one)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT; exit status 2 when the service is not available."""
    from cryostack.config import ObjectStoreSettings, ServiceSettings  # noqa: PLC0415  (only when serving)
    from cryostack.runtime.server import serve  # noqa: PLC0415

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        registrar = load_registrar(args.service)
    except ServiceNotAvailableError as error:
        print(f"cryostack serve: {error}", file=sys.stderr)
        return 2
    overrides = {name: value for name, value in (("host", args.host), ("port", args.port)) if value is not None}
    serve(ServiceSettings(**overrides), ObjectStoreSettings(), registrar)
    return 0
