"""`cryostack objectstore start|stop|status`: the embedded SeaweedFS object store on 127.0.0.1.

``start`` prints shell lines to stdout, so that ``eval "$(cryostack objectstore start)"`` configures the current
shell::

    # cryostack object store at http://127.0.0.1:8333 (pid 4242, state /home/me/.cryostack/objectstore)
    export CRYOSTACK_S3_ENDPOINT=127.0.0.1:8333
    export CRYOSTACK_S3_SECURE=false
    export CRYOSTACK_S3_ACCESS_KEY=CS...
    export CRYOSTACK_S3_SECRET_KEY="$(cat '/home/me/.cryostack/objectstore/secret_key')"

The secret itself is never printed unless ``--show-secret`` is given; it stays in the state directory (mode 0600).
``--env-file PATH`` additionally appends ``NAME=value`` lines, secret included, to PATH (created with mode 0600):
the format of dotenv files, ``docker --env-file`` and CI runners' ``$GITHUB_ENV``. ``--free-ports`` picks free ports
instead of the configured ones. ``start`` on a running store prints the same lines and leaves it running.

``status`` exits 0 when the store runs and 3 when it does not; ``stop`` sends SIGTERM to the recorded PID, then
SIGKILL after 30 s.

Configuration: ``CRYOSTACK_EMBEDDED_*`` (state dir and ports) and, for the credentials of a first start,
``CRYOSTACK_S3_ACCESS_KEY`` / ``CRYOSTACK_S3_SECRET_KEY``; flags override the state dir and ports.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryostack.io.embedded import EmbeddedStore

NOT_RUNNING_STATUS = 3


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `objectstore` and its start/stop/status subcommands."""
    parser = subparsers.add_parser("objectstore", help="run the embedded S3 object store (SeaweedFS) locally")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    start = actions.add_parser("start", help="start the store and print the shell lines that point cryostack at it")
    _add_state_dir(start)
    start.add_argument("--free-ports", action="store_true", help="pick free ports instead of the configured ones")
    for component in ("s3", "master", "volume", "filer", "admin"):
        start.add_argument(f"--{component}-port", type=int, help=f"HTTP port of the {component} component")
    start.add_argument("--show-secret", action="store_true", help="print the secret key itself in the export line")
    start.add_argument("--env-file", type=Path, help="also append NAME=value lines, secret included, to this file")
    start.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the store to answer")
    start.set_defaults(func=_start)

    stop = actions.add_parser("stop", help="stop the store of a state directory")
    _add_state_dir(stop)
    stop.set_defaults(func=_stop)

    status = actions.add_parser("status", help="say whether the store runs (exit 0) or not (exit 3)")
    _add_state_dir(status)
    status.set_defaults(func=_status)


def _add_state_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state-dir", help="data, credentials, PID file and log (default CRYOSTACK_EMBEDDED_STATE_DIR)")


def _store(args: argparse.Namespace, *, with_credentials: bool = False) -> EmbeddedStore:
    """The embedded store named by the flags and CRYOSTACK_EMBEDDED_* (credentials from CRYOSTACK_S3_* if asked)."""
    from cryostack.config import EmbeddedStoreSettings, ObjectStoreSettings  # noqa: PLC0415
    from cryostack.io.embedded import EmbeddedPorts, EmbeddedStore, free_ports  # noqa: PLC0415

    settings = EmbeddedStoreSettings()
    if args.state_dir:
        settings = settings.model_copy(update={"state_dir": args.state_dir})
    credentials = ObjectStoreSettings() if with_credentials else None
    store = EmbeddedStore.from_settings(settings, credentials)
    if getattr(args, "free_ports", False):
        store.ports = free_ports()
    elif with_credentials:
        ports = EmbeddedPorts.from_settings(settings)
        overrides = {name: getattr(args, f"{name}_port") for name in ("s3", "master", "volume", "filer", "admin")}
        store.ports = EmbeddedPorts(**{name: overrides[name] or getattr(ports, name) for name in overrides})
    return store


def _start(args: argparse.Namespace) -> int:
    from cryostack.errors import InvalidArgumentError, UnavailableError  # noqa: PLC0415

    try:
        store = _store(args, with_credentials=True)
        settings = store.start(timeout_s=args.timeout)
    except (InvalidArgumentError, UnavailableError) as error:
        print(f"cryostack objectstore start: {error}", file=sys.stderr)
        return 1
    secret = settings.secret_key.get_secret_value()
    status = store.status()
    print(f"# cryostack object store at http://{settings.endpoint} (pid {status.pid}, state {store.state_dir})")
    print(f"export CRYOSTACK_S3_ENDPOINT={shlex.quote(settings.endpoint)}")
    print("export CRYOSTACK_S3_SECURE=false")
    print(f"export CRYOSTACK_S3_ACCESS_KEY={shlex.quote(settings.access_key.get_secret_value())}")
    if args.show_secret:
        print(f"export CRYOSTACK_S3_SECRET_KEY={shlex.quote(secret)}")
    else:
        print(f'export CRYOSTACK_S3_SECRET_KEY="$(cat {shlex.quote(str(store.secret_key_path))})"')
    if args.env_file:
        lines = (
            f"CRYOSTACK_S3_ENDPOINT={settings.endpoint}\n"
            "CRYOSTACK_S3_SECURE=false\n"
            f"CRYOSTACK_S3_ACCESS_KEY={settings.access_key.get_secret_value()}\n"
            f"CRYOSTACK_S3_SECRET_KEY={secret}\n"
        )
        descriptor = os.open(args.env_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(descriptor, "a") as handle:
            handle.write(lines)
    return 0


def _stop(args: argparse.Namespace) -> int:
    store = _store(args)
    if store.stop():
        print(f"stopped the object store in {store.state_dir}")
    else:
        print(f"no object store was running in {store.state_dir}")
    return 0


def _status(args: argparse.Namespace) -> int:
    status = _store(args).status()
    if status.running:
        print(f"running: http://{status.endpoint} (pid {status.pid}, state {status.state_dir})")
        return 0
    print(f"not running (state {status.state_dir})")
    return NOT_RUNNING_STATUS
