"""TLS and mutual TLS on the gRPC server, with certificates made by openssl for 127.0.0.1."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cryostack.config import ServiceSettings
from cryostack.runtime.client import JobClient, TlsClientFiles, open_channel


def openssl(*args: str, cwd: Path) -> None:
    """Run one openssl command in `cwd`."""
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make test certificates")
    folder = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=cryostack-test-ca",
            "-keyout", "ca.key", "-out", "ca.pem", cwd=folder)
    (folder / "server.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name in ("server", "client"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
                "-out", f"{name}.csr", cwd=folder)
        extensions = ["-extfile", "server.ext"] if name == "server" else []
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-days", "2", "-out", f"{name}.pem", *extensions, cwd=folder)
    return folder


def health_status(channel: grpc.Channel) -> int:
    """The server's overall health over `channel`."""
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status


def test_tls_server_answers_tls_clients_only(start_server, certificates: Path) -> None:
    local = start_server(tls_cert_file=str(certificates / "server.pem"), tls_key_file=str(certificates / "server.key"))
    with open_channel(local.address, TlsClientFiles(ca_file=str(certificates / "ca.pem"))) as channel:
        assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(local.address) as channel, pytest.raises(grpc.RpcError) as refused:
        health_status(channel)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_refuses_a_client_without_a_certificate(start_server, certificates: Path) -> None:
    local = start_server(
        tls_cert_file=str(certificates / "server.pem"),
        tls_key_file=str(certificates / "server.key"),
        tls_client_ca_file=str(certificates / "ca.pem"),
    )
    anonymous = TlsClientFiles(ca_file=str(certificates / "ca.pem"))
    with open_channel(local.address, anonymous) as channel, pytest.raises(grpc.RpcError) as refused:
        health_status(channel)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

    authenticated = TlsClientFiles(
        ca_file=str(certificates / "ca.pem"),
        cert_file=str(certificates / "client.pem"),
        key_file=str(certificates / "client.key"),
    )
    with JobClient(local.address, tls=authenticated) as client:
        assert list(client.list()) == []


def test_tls_settings_must_come_in_pairs() -> None:
    with pytest.raises(ValueError, match="tls_cert_file and tls_key_file"):
        ServiceSettings(tls_cert_file="server.pem")
    with pytest.raises(ValueError, match="mTLS"):
        ServiceSettings(tls_client_ca_file="ca.pem")
