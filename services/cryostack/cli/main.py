"""Entry point of the `cryostack` command: discovers the subcommand modules of this package and dispatches."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence

import cryostack.cli as cli_package

_NOT_COMMANDS = {"main", "common"}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per module in `cryostack.cli` that defines `add_parser`."""
    parser = argparse.ArgumentParser(prog="cryostack", description="Cryo-EM single-particle processing stack.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_info in sorted(pkgutil.iter_modules(cli_package.__path__), key=lambda m: m.name):
        if module_info.name in _NOT_COMMANDS:
            continue
        module = importlib.import_module(f"{cli_package.__name__}.{module_info.name}")
        module.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, run the chosen subcommand and return its exit status."""
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
