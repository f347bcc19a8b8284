"""The embedded SeaweedFS: outages and recovery, `cryostack objectstore start|status|stop` as a subprocess."""

from __future__ import annotations

import logging
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from pydantic import SecretStr

from cryostack.config import ObjectStoreSettings
from cryostack.errors import InvalidArgumentError, UnavailableError
from cryostack.io.embedded import EmbeddedStore, free_ports
from cryostack.io.objectstore import ObjectStore


def test_an_outage_fails_after_the_retries_and_a_restart_recovers(start_embedded_store, caplog):
    embedded = start_embedded_store()
    impatient = ObjectStore(embedded.object_store_settings(max_attempts=3, backoff_initial_s=0.1))
    impatient.ensure_bucket("outage")
    impatient.put_bytes("s3://outage/x.bin", b"payload")
    assert embedded.stop()
    with caplog.at_level(logging.WARNING, logger="cryostack.io.objectstore"):
        with pytest.raises(UnavailableError, match="unavailable after 3 attempts"):
            impatient.get_bytes("s3://outage/x.bin")
    assert len([r for r in caplog.records if "retrying" in r.getMessage()]) == 2

    # A client that is still retrying when the store comes back succeeds.
    patient = ObjectStore(embedded.object_store_settings(max_attempts=10, backoff_initial_s=0.2))
    restart = threading.Timer(0.3, embedded.start)
    restart.start()
    assert patient.get_bytes("s3://outage/x.bin") == b"payload"
    restart.join()
    assert embedded.status().running
    assert impatient.get_bytes("s3://outage/x.bin") == b"payload"
    assert embedded.start().endpoint == impatient.settings.endpoint  # starting a running store changes nothing


def test_start_refuses_ports_in_use_and_ports_without_a_grpc_partner(tmp_path):
    ports = free_ports()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", ports.filer + 10_000))
        taken.listen()
        with pytest.raises(UnavailableError, match="in use"):
            EmbeddedStore(tmp_path / "store", ports).start()
    with pytest.raises(InvalidArgumentError, match="gRPC port is"):
        replace(ports, s3=60_000)


def cli(state: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "cryostack.cli.main", "objectstore", *args, "--state-dir", str(state)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=env or clean_env())


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("CRYOSTACK_S3_", "CRYOSTACK_EMBEDDED_"))}


def exports(stdout: str) -> dict[str, str]:
    lines = [line.removeprefix("export ") for line in stdout.splitlines() if line.startswith("export ")]
    return dict(line.split("=", 1) for line in lines)


def pid_alive(pid: int) -> bool:
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def test_cli_starts_reports_and_stops_the_store(tmp_path):
    state, env_file = tmp_path / "store", tmp_path / "s3.env"
    started = cli(state, "start", "--free-ports", "--env-file", str(env_file))
    assert started.returncode == 0, started.stderr
    printed = exports(started.stdout)
    secret = (state / "secret_key").read_text().strip()
    assert secret and secret not in started.stdout  # never printed without --show-secret
    for private in (state / "secret_key", state / "identities.json", env_file):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    file_values = dict(line.split("=", 1) for line in env_file.read_text().splitlines())
    assert file_values["CRYOSTACK_S3_SECRET_KEY"] == secret
    assert file_values["CRYOSTACK_S3_ENDPOINT"] == printed["CRYOSTACK_S3_ENDPOINT"]

    evaluated = subprocess.run(
        ["bash", "-c", 'eval "$1"; printf %s "$CRYOSTACK_S3_SECRET_KEY"', "_", started.stdout],
        capture_output=True, text=True, timeout=30, check=True,
    )
    assert evaluated.stdout == secret  # the printed lines configure a shell

    settings = ObjectStoreSettings(
        endpoint=printed["CRYOSTACK_S3_ENDPOINT"], access_key=SecretStr(printed["CRYOSTACK_S3_ACCESS_KEY"]),
        secret_key=SecretStr(secret), secure=False,
    )
    store = ObjectStore(settings)
    store.ensure_bucket("cli-bucket")
    store.put_bytes("s3://cli-bucket/a", b"kept")

    assert cli(state, "status").returncode == 0

    pid = int((state / "weed.pid").read_text())
    port = int(printed["CRYOSTACK_S3_ENDPOINT"].rsplit(":", 1)[1])
    stopped = cli(state, "stop")
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    deadline = time.monotonic() + 10
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not pid_alive(pid)
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=5):
        pass  # nothing listens on the S3 port any more
    assert cli(state, "status").returncode == 3

    # Credentials from the environment replace the stored ones; the data survives the restart.
    env = {**clean_env(), "CRYOSTACK_S3_ACCESS_KEY": "CSFROMENVIRONMENT001",
           "CRYOSTACK_S3_SECRET_KEY": "from-env-secret"}
    restarted = cli(state, "start", "--free-ports", "--show-secret", env=env)
    assert restarted.returncode == 0, restarted.stderr
    values = exports(restarted.stdout)
    assert values["CRYOSTACK_S3_ACCESS_KEY"] == "CSFROMENVIRONMENT001"
    assert values["CRYOSTACK_S3_SECRET_KEY"] == "from-env-secret"
    moved = ObjectStore(settings.model_copy(update={
        "endpoint": values["CRYOSTACK_S3_ENDPOINT"], "access_key": SecretStr("CSFROMENVIRONMENT001"),
        "secret_key": SecretStr("from-env-secret"),
    }))
    assert moved.get_bytes("s3://cli-bucket/a") == b"kept"
    assert EmbeddedStore(state, free_ports()).stop()  # stop works from any process, by the recorded PID
